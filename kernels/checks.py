"""Argument checks shared by the fused linear-head ops.

Every check here reads shapes, dtypes and devices only, except the target-range check, which
reads values: always on the CPU (where a sync costs nothing), and as a device-side assert on
CUDA (`torch._assert_async`: no host sync, the error surfaces at the next synchronising call).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)


def check_linear_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    temperature: float,
    softcap: Optional[float],
    *,
    names: tuple = ("hidden", "weight", "targets", "bias"),
    allow_empty: bool = False,
) -> tuple:
    """Validate a fused-head call; returns `(H, V)`.

    hidden: (…, H), weight: (V, H), targets: (…) int or None, bias: (V,) or None.
    `allow_empty`: V = 0 is a vocabulary shard with no rows (vocab_parallel.py), not an error.
    """
    h_name, w_name, y_name, b_name = names
    for name, t in ((h_name, hidden), (w_name, weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has unsupported dtype {t.dtype}; use float32, bfloat16 or float16")
    if hidden.dim() < 1:
        raise ValueError(f"{h_name} must have shape (…, H), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{w_name} must have shape (V, H), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{w_name} dtype {weight.dtype} differs from {h_name} dtype {hidden.dtype}; "
            f"cast one of them (e.g. {h_name}.to({w_name}.dtype))"
        )
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(
            f"hidden size mismatch: {h_name} has H={hidden.shape[-1]} but {w_name} has H={H} "
            f"({w_name} must be (V, H), not (H, V))"
        )
    if V == 0 and not allow_empty:
        raise ValueError(f"{w_name} has an empty vocabulary (V=0)")
    if hidden.device != weight.device:
        raise ValueError(f"{h_name} is on {hidden.device} but {w_name} is on {weight.device}; move them together")
    if targets is not None:
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"{y_name} must be a torch.Tensor, got {type(targets).__name__}")
        if targets.dtype not in INDEX_DTYPES:
            raise TypeError(f"{y_name} must be int64 or int32, got {targets.dtype}; use {y_name}.long()")
        if tuple(targets.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"{y_name} shape {tuple(targets.shape)} must equal the leading shape of {h_name} "
                f"{tuple(hidden.shape[:-1])}"
            )
        if targets.device != hidden.device:
            raise ValueError(f"{y_name} is on {targets.device} but {h_name} is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{b_name} must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{b_name} has unsupported dtype {bias.dtype}")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"{b_name} must have shape (V,) = ({V},), got {tuple(bias.shape)}")
        if bias.device != weight.device:
            raise ValueError(f"{b_name} is on {bias.device} but {w_name} is on {weight.device}")
    check_positive("temperature", temperature)
    if softcap is not None:
        check_positive("softcap", softcap)
    return H, V


def check_positive(name: str, value) -> None:
    """A Python number that is finite and > 0 (tensors are refused: reading one would sync)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_chunk_bytes(chunk_bytes) -> None:
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")


def device_assert(condition: torch.Tensor, message: str) -> None:
    """Assert a 0-d bool tensor without a host sync on CUDA: the error surfaces at the next synchronising
    call (a CUDA device-side assert, which ends the process's CUDA context). On the CPU it raises at once."""
    torch._assert_async(condition, message)


def check_target_range(targets: torch.Tensor, V: int, ignore_index: int, name: str = "targets") -> None:
    """Every target is in [0, V) or equals `ignore_index`. No host sync on CUDA."""
    if targets.numel() == 0:
        return
    ok = ((targets >= 0) & (targets < V)) | (targets == ignore_index)
    if targets.is_cuda:
        device_assert(ok.all(), f"{name} out of range [0, {V}) and not ignore_index={ignore_index}")
        return
    if not bool(ok.all()):
        bad = targets[~ok]
        raise ValueError(
            f"{name} must lie in [0, V={V}) or equal ignore_index={ignore_index}; "
            f"found {bad.numel()} bad value(s), e.g. {int(bad[0])}"
        )
