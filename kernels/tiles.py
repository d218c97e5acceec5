"""Shared Triton pieces of every fused-head kernel: tile configurations, the logit tile, the dz store.

One logit tile of one head, for BLOCK_N tokens × BLOCK_V vocabulary columns:
    r = h Wᵀ + b                      raw logits, fp32 accumulator (`tl.dot`: bf16/fp16 tensor cores)
    t = tanh(r / softcap)             (optional, Gemma 2)
    z = softcap · t / T   or   r / T  final logits
and the chain rule back from ∂L/∂z to ∂L/∂r = ∂L/∂z · (1/T) · (1 − t²), stored in dz's dtype with
ignored rows zeroed. Every op kernel (log-probs, KL; forward and backward) forms its tiles here, so
the softcap / temperature transform is written once.

Tile shapes depend on (H, V, dtype) and the number of heads a kernel holds, never on N: a token's
result must not depend on the batch it is scored in (batch invariance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 (the CPU test suite) kernels take an fp32 dot path (see raw_logits_tile); the
# launchers read `interpreting` from here (compile_check.py swaps it to compile on a CPU).
from .common import interpreting  # noqa: F401

# Finite "-inf" start of a running max: keeps 0·(m_old − m_new) finite. A jit function may only read
# module globals that are `tl.constexpr`: the interpreter accepts a plain float, the GPU compiler does not.
NEG_BIG = tl.constexpr(-1.0e30)




@dataclass(frozen=True)
class TileConfig:
    """Tile shapes for one (H, V, dtype, heads) class. Never depends on N (batch invariance)."""

    BLOCK_N: int
    BLOCK_V: int
    BLOCK_K: int
    split_cols: int  # vocabulary columns per forward split (multiple of BLOCK_V)
    num_warps: int
    num_stages: int


def tile_config(H: int, V: int, dtype: torch.dtype, heads: int = 1, extra_stats: bool = False) -> TileConfig:
    """`heads`: logit tiles a kernel keeps live at once (2 for the KL kernels: policy and reference);
    `extra_stats`: the log-prob forward also reduces q, zs, mb (linear_logps_triton.py's EXTRA).

    Register budget (255 per thread): a (BLOCK_N, BLOCK_V) fp32 accumulator costs BLOCK_N·BLOCK_V /
    (32·num_warps) registers per thread, and the epilogue holds two or three tiles of that size. So a
    two-head kernel halves BLOCK_V. Checked by tests/kernels/test_cuda_compile.py (no spills on
    sm_80/sm_90); see benchmarks/results/kernel_report.md.
    """
    if interpreting():
        # Small tiles keep the numpy interpreter fast and, with several splits, exercise the merge; a wide
        # vocabulary takes wide tiles (the interpreter's cost is per tile, not per element).
        if V > 2048:
            return TileConfig(16, 512, 32, 4096, 1, 1)
        return TileConfig(16, 32, 32, 64, 1, 1)
    if dtype == torch.float32:
        # IEEE fp32 dots run on FMA units, whose operand layouts cost more registers than MMA's: a
        # two-head kernel doubles the warps instead (64 × 32 tiles with 8 warps spilled: ptxas capped
        # them at 128 registers). The extra statistics took the fp32 forward from 168 registers to past 255
        # (spills): they double the warps too, with the same tile shape.
        return TileConfig(64, 64, 16, 4096, 4 * heads * (2 if extra_stats else 1), 3)
    # The extra statistics (three more row reductions per tile) spilled at 128 × 128 on sm_80 (bf16 already
    # sits at 255 registers there): they halve BLOCK_V, like a second head.
    return TileConfig(128, 128 // (heads * (2 if extra_stats else 1)), 64, 4096, 8, 3)


def tile_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype whose tile configuration fits every head of a kernel: fp32 when any head is fp32 (a bf16
    policy with an fp32 reference took the bf16 tile from the policy alone and spilled 32 bytes at 255
    registers on sm_90, issue 30)."""
    return torch.float32 if torch.float32 in dtypes else dtypes[0]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact IEEE products (TF32 would cost ~1e-3 relative error in the logits)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def raw_logits_tile(
    h_ptr, w_ptr, b_ptr,
    offs_n, offs_v, N, V, H,
    stride_h_n, stride_h_k, stride_w_v, stride_w_k,
    HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """r[n, v] = h[n] · W[v] (+ b[v]) for one (BLOCK_N, BLOCK_V) tile, fp32 accumulator."""
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_v = offs_v < V
    # int64 offsets: V·H passes 2^31 at V = 262,144, H = 8,192.
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_h_n
    w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * stride_w_v
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        h = tl.load(h_rows + k.to(tl.int64)[None, :] * stride_h_k, mask=mask_n[:, None] & (k[None, :] < H), other=0.0)
        w = tl.load(w_cols + k.to(tl.int64)[:, None] * stride_w_k, mask=(k[:, None] < H) & mask_v[None, :], other=0.0)
        if INTERPRET:
            # Interpreter only: fp32 broadcast-multiply-sum. Its tl.dot would multiply raw bf16 bit
            # patterns (triton-lang/triton#11584) and go through a BLAS whose rounding depends on a
            # row's position in the tile, which would fake a batch-invariance failure.
            acc += tl.sum(h.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        else:
            acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def tanh(x):
    # tanh via exp, saturating correctly at ±inf; libdevice is not available to the interpreter.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def final_logits_tile(
    h_ptr, w_ptr, b_ptr,
    offs_n, offs_v, N, V, H,
    stride_h_n, stride_h_k, stride_w_v, stride_w_k,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """(z, t): final logits softcap·tanh(r/softcap)/T (or r/T) of one tile, and t = tanh(r/softcap),
    which `store_dz` needs for the softcap's derivative (without softcap t is unused)."""
    r = raw_logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, H,
                        stride_h_n, stride_h_k, stride_w_v, stride_w_k,
                        HAS_BIAS, INTERPRET, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    if SOFTCAP:
        t = tanh(r / softcap)
        z = softcap * t * inv_temp
    else:
        t = r
        z = r * inv_temp
    return z, t


@triton.jit
def store_dz(dz, t, valid, dz_ptr, offs_n, offs_v, mask_n, mask_v, stride_dz_n, inv_temp, SOFTCAP: tl.constexpr):
    """∂L/∂z -> ∂L/∂r (through 1/T and the softcap's 1 − tanh²), zero on invalid rows, store in dz's dtype."""
    dz = dz * inv_temp
    if SOFTCAP:
        dz = dz * (1.0 - t * t)
    # Ignored rows contribute exactly nothing, even if their hidden state is NaN.
    dz = tl.where(valid[:, None], dz, 0.0)
    out = dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dz_n + offs_v[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])
