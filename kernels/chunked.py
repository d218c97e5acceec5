"""Shared PyTorch pieces of the chunked backends (and of the backward's GEMMs): fp32 logits of a chunk.

The torch twins of tiles.py: `final_logits` forms z = softcap·tanh((h Wᵀ + b)/softcap)/T for a token
chunk in one fp32 buffer, `softcap_factor_` recovers the softcap's derivative from z, `chunk_rows`
sizes chunks from a byte budget, and `mm_f32` is the fp32-output matmul every path uses.
"""

from __future__ import annotations

import functools

import torch

# `torch.mm(..., out_dtype=)` (the `aten::mm.dtype` overload, PyTorch ≥ 2.8; CUDA kernels only): bf16/fp16
# operands on tensor cores with an fp32 result. Without it, upcasting is correct but copies the operands.
HAS_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: (M, K), b: (K, N), same dtype  ->  (M, N) fp32, accumulated in fp32.

    Autocast is switched off here: under bf16 autocast `a @ b` of fp32 operands would return bf16
    logits (found by running the engine's head path under CPU autocast).
    """
    with torch.autocast(a.device.type, enabled=False):
        if a.dtype == torch.float32:
            return a @ b
        if a.is_cuda and HAS_MM_OUT_DTYPE:
            return torch.mm(a, b, out_dtype=torch.float32)
        return a.float() @ b.float()


def chunk_rows(N: int, V: int, chunk_bytes: int, bytes_per_logit: int) -> int:
    """Tokens per chunk so that `bytes_per_logit` bytes for each of (rows, V) logits fit `chunk_bytes`."""
    return max(1, min(N, chunk_bytes // (bytes_per_logit * V)))


def final_logits(hidden_c, weight, bias, temperature, softcap):
    """hidden_c: (n, H) -> final logits z = softcap·tanh((h Wᵀ + b)/softcap)/T: (n, V) fp32, one buffer.

    Everything after the matmul is in place. The softcap's tanh is not kept: t = z·T/softcap.
    """
    z = mm_f32(hidden_c, weight.T)
    if bias is not None:
        z += bias.float()
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def softcap_factor_(z, temperature, softcap):
    """In place: final logits z -> ∂z/∂r · T = 1 − t², with t = tanh(r/softcap) = z·T/softcap."""
    return z.mul_(temperature / softcap).square_().neg_().add_(1.0)


def autocast_off(fn):
    """Run a chunked-backend function with autocast off on its first argument's device: it picks every dtype
    itself, and under autocast its fp32 `bmm` / `@` would run in bf16 (found by TRL's autocast parity test:
    entropy off by 5e-3 under CPU bf16 autocast)."""

    @functools.wraps(fn)
    def wrapped(first, *args, **kwargs):
        with torch.autocast(first.device.type, enabled=False):
            return fn(first, *args, **kwargs)

    return wrapped
