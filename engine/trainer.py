"""The supervised training step shared by SFT, reward modelling and DPO, on the run loop (loop.py).

step: micro-batches → loss (fused head) → backward → clip → AdamW → schedule → metrics.
A loss function maps a list of examples to (loss, metrics, tokens); everything else lives here.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpoint import latest_checkpoint, load_optimizer_and_rng, save_checkpoint, save_optimizer_and_rng, \
    save_sharded_checkpoint
from .config import SupervisedConfig, TrainConfig
from .data import DataStream
from .distributed import DistInfo, all_reduce_mean, all_reduce_sum, rank_slice, run, unwrap
from .loop import NonFiniteLoss, check_finite, resume_or_fresh, run_loop

__all__ = ["train", "autocast", "resolve_device", "set_threads", "lr_lambda", "enable_gradient_checkpointing", "NonFiniteLoss"]


def resolve_device(name: str) -> torch.device:
    """cpu, cuda[:i] or auto; under torchrun with CUDA, each rank's own GPU (cuda:LOCAL_RANK)."""
    if name in ("auto", "cuda") and torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_threads(n: int) -> None:
    """torch's intra-op CPU threads (0: leave torch's default). CPU kernels may split a reduction by thread, so
    the count is part of what makes a run reproducible."""
    if n and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to the peak, then cosine / linear decay to 0 at max_steps, or constant."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return f


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA when --bf16 (the default); full precision elsewhere."""
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    target = getattr(model, "lm", model)  # a RewardModel checkpoints its backbone
    (getattr(target, "activation_checkpointing_enable", None) or target.gradient_checkpointing_enable)()


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
    run_dir = Path(cfg.output_dir)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    state = resume_or_fresh(run_dir, cfg, info)
    if state is not None:  # the model itself was loaded from that checkpoint by the caller
        # The optimizer through DCP: a run may resume on another number of ranks than it was saved from.
        load_optimizer_and_rng(latest_checkpoint(run_dir), {"": model}, optimizer, info.rank)
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
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
        optimizer.zero_grad(set_to_none=True)
        totals, tokens = {}, 0
        for _ in range(cfg.grad_accum):
            loss, logged, n_tok = micro_step(stream.next_batch())
            check_finite(logged["loss"], "loss", step + 1, run_dir)  # the rank-mean: every rank stops together
            (loss / cfg.grad_accum).backward()
            tokens += n_tok
            for k, v in logged.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        check_finite(grad_norm, "gradient norm", step + 1, run_dir)
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        out = {**totals, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / (time.perf_counter() - t0)}
        if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            out.update(eval_fn())
            model.train()
        return out

    def save_fn(at: int) -> Path:
        trainer_state = {"step": at, "scheduler": scheduler.state_dict(), "data": stream.state_dict(),
                         "config": asdict(cfg)}
        if info.active:
            return save_sharded_checkpoint(run_dir, at, {"": model}, optimizer, tokenizer, trainer_state,
                                           keep=cfg.save_total_limit, info=info)
        return save_checkpoint(run_dir, at, model, tokenizer, trainer_state, keep=cfg.save_total_limit,
                               extra=lambda d: save_optimizer_and_rng(d, {"": model}, optimizer))

    start = state["step"] if state is not None else 0
    return run_loop(cfg, run_dir, start, step_fn, save_fn, device=device, desc=desc, postfix=("loss", "lr"),
                    info=info)
