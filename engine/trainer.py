"""The supervised training step shared by SFT, reward modelling and DPO, on the run loop (loop.py).

step: micro-batches → loss (fused head) → backward → clip → AdamW → schedule → metrics.
An objective maps a list of examples to (loss, metrics, tokens[, units]); the state (models, optimizer, schedule,
data position) is a `TrainState` (state.py); everything else lives here.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from .config import SupervisedConfig
from .data import DataStream
from .distributed import DistInfo, all_reduce_mean, all_reduce_sum, rank_slice, run, unwrap
from .errors import NonFiniteLoss  # noqa: F401  (re-exported: what a trainer raises on a non-finite loss)
from .loop import check_finite, run_loop
from .runtime import autocast, enable_gradient_checkpointing
from .state import TrainState

__all__ = ["train", "NonFiniteLoss"]


def train(
    cfg: SupervisedConfig,
    model: torch.nn.Module,
    loss_fn: Callable[[list], tuple],
    stream: DataStream,
    *,
    tokenizer=None,
    eval_fn: Optional[Callable[[], dict]] = None,
    desc: str = "train",
    info: DistInfo = DistInfo(),
) -> dict:
    """Run to cfg.max_steps (continuing from the latest checkpoint with cfg.resume). Returns the last metrics.

    `loss_fn(examples)` returns (loss, metrics, tokens[, units]). With several ranks (`info`), `model` is the
    FSDP root (distributed.InForward) and each rank takes its slice of every global batch; its loss is weighted
    by units_rank · world / units_total, so that FSDP's gradient average is the gradient of the global batch's
    mean, and the logged metrics are the units-weighted means over ranks.
    """
    device = next(model.parameters()).device
    state = TrainState(cfg, {"": model}, info=info, tokenizer=tokenizer, extras={"data": stream})
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(unwrap(model))
    model.train()

    def micro_step(examples: list):
        local = rank_slice(examples, info)
        # Fewer examples than ranks (a small batch, or an epoch's short last batch): this rank still runs the
        # forward and backward that FSDP's collectives expect, on one example weighted 0.
        empty = not local
        if empty:
            local = examples[:1]
        with autocast(cfg, device):
            out = run(model, lambda _inner: loss_fn(local))  # inside the FSDP root's forward
        loss, metrics, n_tok = out[:3]
        units = 0.0 if empty else float(out[3]) if len(out) > 3 else 1.0
        n_tok = 0 if empty else n_tok
        total_units = all_reduce_sum(units, info)
        weight = units * info.world_size / total_units  # 1 in a single process
        logged = all_reduce_mean({"loss": float(loss.detach()), **{k: float(torch.as_tensor(v).detach())
                                                                   for k, v in metrics.items()}}, info, units)
        return loss * weight, logged, all_reduce_sum(n_tok, info)

    def step_fn(step: int) -> dict:
        t0 = time.perf_counter()
        state.optimizer.zero_grad(set_to_none=True)
        totals, tokens = {}, 0
        for _ in range(cfg.grad_accum):
            loss, logged, n_tok = micro_step(stream.next_batch())
            check_finite(logged["loss"], "loss", step + 1, state.run_dir)  # the rank-mean: every rank stops together
            (loss / cfg.grad_accum).backward()
            tokens += n_tok
            for k, v in logged.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(state.params,
                                                   cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        check_finite(grad_norm, "gradient norm", step + 1, state.run_dir)
        state.optimizer.step()
        lr = state.scheduler.get_last_lr()[0]
        state.scheduler.step()
        out = {**totals, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / (time.perf_counter() - t0)}
        if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            out.update(eval_fn())
            model.train()
        return out

    return run_loop(cfg, state, step_fn, device=device, desc=desc, postfix=("loss", "lr"), info=info)
