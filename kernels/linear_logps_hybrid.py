"""Candidate "hybrid": cuBLAS forms a bounded chunk of fp32 logits, one Triton pass reduces it.

Forward, per chunk of C token rows (C fixed by (V, chunk_bytes), never by N):
    r = h_chunk Wᵀ             cuBLAS, bf16/fp16 operands on tensor cores, fp32 output
                               (`torch.mm(..., out_dtype=torch.float32)`: no bf16 rounding of the logits,
                               unlike a bf16 GEMM followed by a softmax; chunked.mm_f32)
    z = softcap(r + b) / T     in the reduce pass
    per (row, vocabulary split): m, s, a, zy [, q, zs, mb]    (tma.lse_tile_update, the fused kernels' math)
then linear_logps_triton's fixed-order merge. The last chunk is zero-padded to C rows so every GEMM has
the same shape: a token's logits do not depend on how many tokens share its batch, provided cuBLAS runs
one algorithm per shape with a per-element reduction order independent of the output tile's position
(true of its data-parallel and split-K kernels; a stream-K schedule would break it — GPU check:
tests/kernels/test_candidates.py::test_hybrid_batch_invariant_cuda).
Cost over the bare GEMM: the chunk's fp32 write and read, 8 bytes per logit (the bare bf16 GEMM writes 2),
and nothing else of size V.

Backward: the same cuBLAS chunk of fp32 raw logits, then one elementwise Triton pass writes ∂L/∂r in the
input dtype (the dz formulas of linear_logps_triton.py); head_backward.py does the two GEMMs.

Memory: the forward's (C, V) fp32 chunk (C·V·4 ≤ chunk_bytes, at least 64 rows); the backward holds
4 bytes per logit besides dz (BWD_BYTES_PER_LOGIT), so head_backward sizes its chunks for 4 + 2 bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from . import linear_logps_triton as _base
from .chunked import autocast_off, mm_f32
from .tiles import NEG_BIG, interpreting, store_dz
from .tma import lse_tile_update, transform_tile

FWD_BYTES_PER_LOGIT = 4  # the (C, V) fp32 logit chunk
BWD_BYTES_PER_LOGIT = 4  # the backward's (n, V) fp32 raw logits, besides dz
ROWS, EXTRA_ROWS = _base.ROWS, _base.EXTRA_ROWS  # kernel constants (common.py's layout)
ROW_ALIGN = 64  # chunk rows are a multiple of this (GEMM tiles), never fewer
MAX_ROWS = 1024  # beyond ~1k rows the GEMM is as efficient as it gets; more only costs memory


def chunk_rows(V: int, chunk_bytes: int) -> int:
    """Rows C of the forward's fp32 logit chunk: C·V·4 ≤ chunk_bytes, a multiple of 64 in [64, 1024]."""
    return max(ROW_ALIGN, min(MAX_ROWS, chunk_bytes // (FWD_BYTES_PER_LOGIT * V)) // ROW_ALIGN * ROW_ALIGN)


def reduce_config(V: int):
    """(BLOCK_R, BLOCK_V, split_cols, num_warps) of the reduce pass, from V only."""
    if interpreting():
        return 8, 32, 64, 1
    return 4, 1024, 16384, 4


@triton.jit(do_not_specialize=["n", "N", "row0"])  # chunk offsets and counts: one binary per flag set
def _hybrid_reduce_kernel(
    z_ptr, b_ptr, y_ptr,
    stats_ptr,  # (SPLITS, ROWS, N) fp32, rows row0 … row0 + n − 1 written
    n, N, V, row0, split_cols, stride_z,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, EXTRA: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(1)
    mask_r = offs_r < n
    y = tl.load(y_ptr + row0 + offs_r, mask=mask_r, other=-1).to(tl.int64)
    m = tl.full((BLOCK_R,), NEG_BIG, tl.float32)
    s = tl.zeros((BLOCK_R,), tl.float32)
    a = tl.zeros((BLOCK_R,), tl.float32)
    zy = tl.zeros((BLOCK_R,), tl.float32)
    q = tl.zeros((BLOCK_R,), tl.float32)
    zs = tl.zeros((BLOCK_R,), tl.float32)
    mb = tl.full((BLOCK_R,), NEG_BIG, tl.float32)
    v_begin = split * split_cols
    v_end = tl.minimum(v_begin + split_cols, V)
    cols = tl.arange(0, BLOCK_V)
    rows = z_ptr + offs_r.to(tl.int64)[:, None] * stride_z
    for v0 in range(v_begin, v_end, BLOCK_V):
        # Columns past V load as exact zeros, as the fused kernels' padded tiles (lse_tile_update relies on it).
        r = tl.load(rows + (v0 + cols)[None, :], mask=mask_r[:, None] & (v0 + cols < V)[None, :], other=0.0)
        z, _ = transform_tile(r, b_ptr, v0 + cols, V, inv_temp, softcap, HAS_BIAS, SOFTCAP)
        m, s, a, zy, q, zs, mb = lse_tile_update(z, cols, (y - v0).to(tl.int32), v_end - v0,
                                                 m, s, a, zy, q, zs, mb, EXTRA)
    width = EXTRA_ROWS if EXTRA else ROWS
    out = stats_ptr + split.to(tl.int64) * width * N + row0 + offs_r
    tl.store(out, m, mask=mask_r)
    tl.store(out + N, s, mask=mask_r)
    tl.store(out + 2 * N, a, mask=mask_r)
    tl.store(out + 3 * N, zy, mask=mask_r)
    if EXTRA:
        tl.store(out + 4 * N, q, mask=mask_r)
        tl.store(out + 5 * N, zs, mask=mask_r)
        tl.store(out + 6 * N, mb, mask=mask_r)


@autocast_off
def partial_stats(hidden, weight, bias, targets, *, temperature, softcap, chunk_bytes, extra=False):
    """Per-split statistics (SPLITS, ROWS, N) fp32 through cuBLAS fp32 logit chunks of chunk_rows(V, chunk_bytes)."""
    N, H = hidden.shape
    V = weight.shape[0]
    C = chunk_rows(V, chunk_bytes)
    BLOCK_R, BLOCK_V, split_cols, warps = reduce_config(V)
    splits = triton.cdiv(V, split_cols)
    stats = torch.empty((splits, common.stat_rows(extra), N), device=hidden.device, dtype=torch.float32)
    z = torch.empty((C, V), device=hidden.device, dtype=torch.float32)
    padded = None
    b = bias.contiguous() if bias is not None else hidden
    for row0 in range(0, N, C):
        n = min(C, N - row0)
        h_c = hidden[row0:row0 + n]
        if n < C:  # the same GEMM shape for every chunk: batch invariance
            padded = torch.zeros((C, H), device=hidden.device, dtype=hidden.dtype)
            padded[:n] = h_c
            h_c = padded
        _mm_into(z, h_c, weight.T)
        _hybrid_reduce_kernel[(triton.cdiv(n, BLOCK_R), splits)](
            z, b, targets, stats,
            n, N, V, row0, split_cols, z.stride(0),
            1.0 / temperature, float(softcap or 1.0),
            HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, EXTRA=extra,
            BLOCK_R=BLOCK_R, BLOCK_V=BLOCK_V, num_warps=warps,
        )
    del padded
    return stats


def _mm_into(out, a, b):
    """out (M, N) fp32 = a @ b, fp32 accumulation, written in place by cuBLAS where PyTorch allows it."""
    from .chunked import HAS_MM_OUT_DTYPE

    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif a.is_cuda and HAS_MM_OUT_DTYPE:
        torch.mm(a, b, out_dtype=torch.float32, out=out)  # `aten::mm.dtype_out`: bf16/fp16 in, fp32 out
    else:  # CPU low precision (tests) or an older PyTorch: upcast copy
        out.copy_(mm_f32(a, b))
    return out


def logps_fwd(hidden, weight, bias, targets, *, temperature, softcap, ignore_index, chunk_bytes, extra=False):
    """As linear_logps_triton.logps_fwd: (logps, entropy, lse, extras)."""
    stats = partial_stats(hidden, weight, bias, targets, temperature=temperature, softcap=softcap,
                          chunk_bytes=chunk_bytes, extra=extra)
    return _base.merge_stats(stats, targets, ignore_index, weight.shape[0], extra)


@triton.jit(do_not_specialize=["N"])
def _hybrid_dz_kernel(
    z_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
    dz_ptr,  # (n, V) chunk of ∂L/∂r, in the input dtype
    N, V, ignore_index, stride_z, stride_dz_n,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ENT_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """linear_logps_triton._logps_bwd_dz_kernel's epilogue on cuBLAS's fp32 raw logits."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=ignore_index).to(tl.int64)
    valid = mask_n & (y != ignore_index)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g_logp = tl.load(g_logp_ptr + offs_n, mask=mask_n, other=0.0)
    r = tl.load(z_ptr + offs_n.to(tl.int64)[:, None] * stride_z + offs_v[None, :],
                mask=mask_n[:, None] & mask_v[None, :], other=0.0)
    z, t = transform_tile(r, b_ptr, offs_v, V, inv_temp, softcap, HAS_BIAS, SOFTCAP)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    if HAS_ENT_GRAD:
        ent = tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0)
        g_ent = tl.load(g_ent_ptr + offs_n, mask=mask_n, other=0.0)
        dz = tl.where(p > 0, -p * (g_logp[:, None] + g_ent[:, None] * (logp + ent[:, None])), 0.0)
    else:
        dz = -g_logp[:, None] * p
    dz += tl.where(offs_v[None, :] == y[:, None], g_logp[:, None], 0.0)
    store_dz(dz, t, valid, dz_ptr, offs_n, offs_v, mask_n, mask_v, stride_dz_n, inv_temp, SOFTCAP)


@autocast_off
def logps_bwd_dz(hidden, weight, bias, targets, lse, entropy, g_logps, g_entropy, dz, *,
                 temperature, softcap, ignore_index):
    """Write ∂L/∂(raw logits) for a chunk into `dz: (n, V)`: cuBLAS fp32 raw logits, one Triton pass."""
    N = hidden.shape[0]
    V = weight.shape[0]
    z = mm_f32(hidden, weight.T)  # (n, V) fp32: BWD_BYTES_PER_LOGIT
    has_ent = g_entropy is not None
    bn, bv, warps = (16, 32, 1) if interpreting() else (32, 256, 8)
    _hybrid_dz_kernel[(triton.cdiv(N, bn), triton.cdiv(V, bv))](
        z, bias.contiguous() if bias is not None else z, targets, lse,
        entropy if has_ent else lse, g_logps, g_entropy if has_ent else g_logps,
        dz,
        N, V, ignore_index, z.stride(0), dz.stride(0),
        1.0 / temperature, float(softcap or 1.0),
        HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, HAS_ENT_GRAD=has_ent,
        BLOCK_N=bn, BLOCK_V=bv, num_warps=warps,
    )
    return dz
