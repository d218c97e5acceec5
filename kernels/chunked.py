"""Shared PyTorch pieces of the chunked backends (and of the backward's GEMMs): fp32 logits of a chunk.

The torch twins of tiles.py: `LogitMap` + `mm_into` + `finish_logits_` form the final logits
z = softcap·tanh((h Wᵀ + b)/softcap)/T of a token chunk in one fp32 workspace, `chunk_rows` sizes chunks from
a byte budget, and `mm_f32` is the fp32-output matmul every path uses.

The chunked backends' speed on the CPU comes from four habits (issue 23): the (chunk, V) logits are written by
`mm_into` (`torch.mm(..., out=)`) into one workspace allocated once per call — a fresh tile per chunk is
page-faulted in again on every chunk; every elementwise step runs in place on a *slab* of rows small enough
to stay in cache (`slabs`, SLAB_BYTES): the GEMM writes the tile to memory once, the passes of the softmax
epilogue then hit the caches instead of DRAM; constant factors ride on the GEMM (`alpha` = 1/T or 1/softcap)
and on per-row coefficients instead of costing a pass each; and a low-precision weight is upcast once per
call (`head_weight`), not once per chunk.
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


# Bytes per slab: the elementwise epilogue works on (slab, V) views of a chunk's tile, with at most two
# scratch slabs beside it, so that all three stay in the caches (L2 + the shared L3) between passes. Measured
# on the 2-core AMD EPYC of issue 23 (benchmarks/NOTES.md).
SLAB_BYTES = 4 << 20


SMALL_SLAB_BYTES = 256 << 10  # a scratch slab this small is negligible whatever the chunk


def slab_rows(V: int, chunk_rows: int) -> int:
    """Rows per slab for a chunk of `chunk_rows` rows: ≤ SLAB_BYTES, and ≤ 1/16 of the chunk unless that is under
    SMALL_SLAB_BYTES; one row at least — so two scratch slabs add at most 1/8 of the chunk's tile (or 512 KiB,
    or two rows: O(V)) to its memory."""
    row = 4 * max(V, 1)
    return max(1, min(SLAB_BYTES // row, max(chunk_rows // 16, SMALL_SLAB_BYTES // row)))


def slabs(n: int, k: int):
    """Row slices of a chunk of n rows, k at a time."""
    return [slice(s, min(n, s + k)) for s in range(0, n, k)]


def scratch(k: int, V: int, device, count: int):
    """`count` fp32 (k, V) scratch slabs, allocated once per call (or per chunk in a backward: ≤ 1/8 of it)."""
    return [torch.empty((k, V), device=device, dtype=torch.float32) for _ in range(count)]


def head_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight the chunk matmuls of one call read: (V, H) fp32 on the CPU — a bf16/fp16 weight upcast once
    per call (V·H·4 bytes, the O(V·H) term of the memory bound) instead of once per chunk — and as given on
    CUDA, where `mm_f32` multiplies low-precision operands into fp32 without a copy."""
    if weight.dtype == torch.float32 or (weight.is_cuda and HAS_MM_OUT_DTYPE):
        return weight
    return weight.float()


class LogitMap:
    """z = softcap·tanh((h Wᵀ + b)/softcap)/T as `alpha` · (h Wᵀ) in the GEMM, then per slab `finish_logits_`:
    without softcap alpha = 1/T and x + b/T; with it alpha = 1/softcap, then (x + b/softcap), tanh, · softcap/T.
    The bias is upcast and pre-scaled once per call. `minus_inf`: whether a logit can be −inf (a −inf bias:
    masked vocabulary) — known on the CPU from the bias (one O(V) check), assumed elsewhere (no host sync).""" 

    def __init__(self, bias, temperature: float, softcap, device):
        self.temperature, self.softcap = float(temperature), softcap
        scale = 1.0 / (softcap if softcap is not None else temperature)
        self.alpha = scale
        self.bias = None if bias is None else bias.float() * scale
        self.post = None if softcap is None else softcap / temperature  # after tanh
        if softcap is not None:  # softcap(−inf) = −softcap: finite
            self.minus_inf = False
        elif device.type != "cpu":
            self.minus_inf = True
        else:  # (an infinite weight or hidden entry can also make one: the backends check the result for it)
            self.minus_inf = bias is not None and bool(torch.isneginf(bias).any())


def mm_into(out: torch.Tensor, hidden_c: torch.Tensor, weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """out (n, V) fp32 <- alpha · hidden_c (n, H) @ weight (V, H)ᵀ, accumulated in fp32, written in place (no new
    tile where both operands are fp32; a low-precision `hidden_c` is upcast, O(n·H))."""
    with torch.autocast(out.device.type, enabled=False):
        if weight.dtype == torch.float32:
            h = hidden_c if hidden_c.dtype == torch.float32 else hidden_c.float()
            if alpha == 1.0:
                return torch.mm(h, weight.T, out=out)
            return torch.addmm(out, h, weight.T, beta=0.0, alpha=alpha, out=out)  # beta = 0: `out` is not read
        out.copy_(mm_f32(hidden_c, weight.T))  # CUDA, low precision: tensor cores, one fp32 product
        return out if alpha == 1.0 else out.mul_(alpha)


def finish_logits_(x: torch.Tensor, lm: LogitMap, factor_out=None) -> torch.Tensor:
    """In place on a slab x = alpha · h Wᵀ (from `mm_into(..., alpha=lm.alpha)`): x <- the final logits z.

    With `factor_out` (a slab-shaped buffer) and a softcap, also writes the softcap's derivative there,
    ∂z/∂r · T = 1 − t² with t = tanh(r/softcap), from t itself (no second tanh)."""
    if lm.bias is not None:
        x += lm.bias
    if lm.softcap is not None:
        x.tanh_()
        if factor_out is not None:
            torch.addcmul(x.new_ones(()), x, x, value=-1.0, out=factor_out)  # 1 − t²
        x.mul_(lm.post)
    return x


def softcap_factor_from_logits(z: torch.Tensor, lm: LogitMap, out: torch.Tensor) -> torch.Tensor:
    """out <- 1 − t² from final logits z (t = z·T/softcap), one pass."""
    return torch.addcmul(z.new_ones(()), z, z, value=-(lm.temperature / lm.softcap) ** 2, out=out)


def chunk_rows(N: int, V: int, chunk_bytes: int, bytes_per_logit: int) -> int:
    """Tokens per chunk so that `bytes_per_logit` bytes for each of (rows, V) logits fit `chunk_bytes`."""
    return max(1, min(N, chunk_bytes // (bytes_per_logit * V)))


def autocast_off(fn):
    """Run a chunked-backend function with autocast off on its first argument's device: it picks every dtype
    itself, and under autocast its fp32 `bmm` / `@` would run in bf16 (found by TRL's autocast parity test:
    entropy off by 5e-3 under CPU bf16 autocast)."""

    @functools.wraps(fn)
    def wrapped(first, *args, **kwargs):
        with torch.autocast(first.device.type, enabled=False):
            return fn(first, *args, **kwargs)

    return wrapped
