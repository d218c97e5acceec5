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
    """Linear warm-up to the peak over W = cfg.num_warmup_steps (--warmup-steps, steps or a ratio), then cosine /
    linear decay to 0 at cfg.max_steps, or constant (cfg.schedule). With W = 0 and linear decay this is
    transformers' `get_linear_schedule_with_warmup`, TRL's default, step for step."""
    warmup = getattr(cfg, "num_warmup_steps", cfg.warmup_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return f


def bf16_enabled(cfg, device: torch.device) -> bool:
    """--bf16 as given; unset (None): on with CUDA, off on CPU."""
    return device.type == "cuda" if cfg.bf16 is None else bool(cfg.bf16)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX-512 BF16 or AMX), read from /proc/cpuinfo;
    without either, oneDNN emulates bf16 and CPU autocast runs slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(cfg, device: torch.device):
    """bf16 autocast when `bf16_enabled` (CUDA by default; CPU with an explicit --bf16), else full precision. The
    fused head computes fp32 logits from bf16 operands in both (kernels' `mm_f32`, Triton's fp32 accumulators)."""
    if bf16_enabled(cfg, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    target = getattr(model, "lm", model)  # a RewardModel checkpoints its backbone
    (getattr(target, "activation_checkpointing_enable", None) or target.gradient_checkpointing_enable)()
