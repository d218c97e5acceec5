"""The supervised training step shared by SFT, reward modelling and DPO, on the run loop (loop.py).

step: micro-batches → loss (fused head) → backward → clip → AdamW → schedule → metrics.
A loss function maps a list of examples to (loss, metrics, tokens); everything else lives here.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .config import SupervisedConfig, TrainConfig
from .data import DataStream
from .loop import NonFiniteLoss, check_finite, resume_or_fresh, run_loop

__all__ = ["train", "autocast", "resolve_device", "set_threads", "lr_lambda", "enable_gradient_checkpointing", "NonFiniteLoss"]


def resolve_device(name: str) -> torch.device:
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
) -> dict:
    """Run to cfg.max_steps (continuing from the latest checkpoint with cfg.resume). Returns the last metrics."""
    run_dir = Path(cfg.output_dir)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    state = resume_or_fresh(run_dir, cfg.resume)
    if state is not None:  # the model itself was loaded from that checkpoint by the caller
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()

    def step_fn(step: int) -> dict:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        totals, tokens = {}, 0
        for _ in range(cfg.grad_accum):
            with autocast(cfg, device):
                loss, metrics, n_tok = loss_fn(stream.next_batch())
            check_finite(loss, "loss", step + 1, run_dir)
            (loss / cfg.grad_accum).backward()
            tokens += n_tok
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(torch.as_tensor(v).detach()) / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        check_finite(grad_norm, "gradient norm", step + 1, run_dir)
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        out = {**totals, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens / (time.perf_counter() - t0)}
        if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            out.update(eval_fn())
            model.train()
        return out

    def save_fn(at: int) -> Path:
        trainer_state = {"step": at, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "data": stream.state_dict(), "rng": rng_state(), "config": asdict(cfg)}
        return save_checkpoint(run_dir, at, model, tokenizer, trainer_state, keep=cfg.save_total_limit)

    start = state["step"] if state is not None else 0
    return run_loop(cfg, run_dir, start, step_fn, save_fn, device=device, desc=desc, postfix=("loss", "lr"))
