"""Where and how a run computes: device, CPU threads, autocast, the learning-rate schedule, gradient checkpointing.

Shared by every trainer (supervised, PPO) and by the study, so none of them imports another's module for them.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Callable

import torch


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


def lr_lambda(cfg) -> Callable[[int], float]:
    """Linear warm-up to the peak over cfg.warmup_steps, then cosine / linear decay to 0 at cfg.max_steps, or
    constant (cfg.schedule)."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return f


def autocast(cfg, device: torch.device):
    """bf16 autocast on CUDA when cfg.bf16 (the default); full precision elsewhere."""
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    target = getattr(model, "lm", model)  # a RewardModel checkpoints its backbone
    (getattr(target, "activation_checkpointing_enable", None) or target.gradient_checkpointing_enable)()
