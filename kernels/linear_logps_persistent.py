"""Candidate "persistent": the fused log-prob / entropy / statistics forward as a persistent TMA kernel.

Same math and the same per-split statistics as linear_logps_triton.py (its `_merge_kernel` combines
them; see that module's docstring for the formulas):
    per (token block, vocabulary split): m = max z, s = Σ e^{z−m}, a = Σ e^{z−m}(z − m), zy = z_y
    [, q = Σ e^{2(z−m)}, zs = Σ z, mb = max_{v<y} z]
What changes is how the GPU is driven (Hopper, sm_90; the same source compiles for sm_80):
  - a persistent grid: min(#SMs, #items) programs walk the work items (token block, vocabulary
    split) in the grouped order of tma.grouped_item, so W tiles are shared in L2 by group_n token
    blocks and each token block's h tiles stay in L2 while its splits are swept (the one-program-per-
    item grid of linear_logps_triton.py runs every token block of one split at once: at N = 16,384,
    H = 4,096 that is 128 MiB of h tiles, re-read from DRAM for every vocabulary tile);
  - tensor descriptors (TMA) for the h and W tiles (operands TMA cannot read, tma.tma_ok, take the
    default kernel);
  - wider tiles: 128 × 256 × 64 with 8 warps (two consumer warpgroups, HGMMA m64n256k16), 0.0117 operand
    bytes per FLOP against 0.0156 for 128 × 128.
Batch invariance is kept: tile shapes and split width come from (H, V, dtype) only, never from
N; an item's statistics do not depend on which program computes it; the merge order is fixed.

Memory: O(N) statistics ((splits, ROWS, N) fp32: 16 MiB at N = 16,384, V = 128,256); no (N, V) buffer.
The backward is linear_logps_triton.py's (the dz kernel recomputes each tile).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import common
from . import linear_logps_triton as _base
from .tiles import NEG_BIG, dot_precision, interpreting
from .tma import (ensure_allocator, group_blocks, grouped_item, lse_tile_update, operand_descriptors, target_arch,
                  tma_logits_tile, tma_ok, transform_tile)

FWD_BYTES_PER_LOGIT = 0
BWD_BYTES_PER_LOGIT = _base.BWD_BYTES_PER_LOGIT
# Rows of the per-split statistics (common.py's layout), as kernel constants.
ROWS = tl.constexpr(common.STAT_ROWS)
EXTRA_ROWS = tl.constexpr(common.EXTRA_STAT_ROWS)


@dataclass(frozen=True)
class PersistentConfig:
    """Tile shapes and order for one (H, V, dtype, heads) class. Never depends on N (batch invariance)."""

    BLOCK_N: int
    BLOCK_V: int
    BLOCK_K: int
    split_cols: int  # vocabulary columns per work item (multiple of BLOCK_V)
    group_n: int  # token blocks per group of the work order (L2 reuse; results do not depend on it)
    num_warps: int
    num_stages: int


def persistent_config(H: int, V: int, dtype: torch.dtype, heads: int = 1, extra_stats: bool = False,
                      arch: int = 90) -> PersistentConfig:
    """Tile shapes from (H, V, dtype, heads, extra statistics, architecture) — never N.

    Register budget as tiles.tile_config: a (BLOCK_N, BLOCK_V) fp32 tile costs BLOCK_N·BLOCK_V/(32·warps)
    registers per thread. On sm_90, 128 × 256 with 8 warps is 128 for the accumulator and the online
    log-sum-exp runs on it in place: 255 registers, no spills, with bias and softcap too (the extra
    statistics and a second head take 128 × 128). sm_80's mma.sync layout spills the 128 × 256 tile
    (144 B): 128 × 128 there, and half-width tiles for the extra statistics or two heads, as tiles.py.
    Checked for every flag by tests/kernels/test_cuda_compile.py; see kernel_report.md.
    group_n: about 16 MiB of h tiles per group (BLOCK_N·H·e bytes per token block), 4 to 64.
    split_cols: 2,048 columns per work item: 63 items per token block at V = 128,256, so with ~132
    programs the last round leaves at most one item per program idle (≤ 1 % at N = 16,384)."""
    if interpreting():
        # Small tiles keep the numpy interpreter fast; several splits and groups exercise the merge and order.
        return PersistentConfig(16, 32, 32, 64, 2, 1, 1)
    e = torch.empty((), dtype=dtype).element_size()
    wide = 1 + (heads == 2 or extra_stats)  # 2: half the columns
    if dtype == torch.float32:
        bn, bv, bk, warps = 64, 64, 16, 4 * wide
    elif arch >= 90:
        bn, bv, bk, warps = 128, 256 // wide, 64, 8
    else:
        bn, bv, bk, warps = 128, 128 // wide, 64, 8
    return PersistentConfig(bn, bv, bk, max(bv, 2048 // bv * bv), group_blocks(bn, H, e * heads), warps, 3)


def num_programs(device: torch.device, items: int) -> int:
    """One program per SM (the tiles take one CTA per SM: see kernel_report.md), never more than the items."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4  # interpreter and offline compile: a few programs, so the persistent loop runs several items
    return max(1, min(sms, items))


@triton.jit(do_not_specialize=["group_n"])  # group_n orders the work only: one binary for all
def _logps_fwd_persistent_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr,
    stats_ptr,  # (SPLITS, ROWS, N) fp32: rows m, s, a, zy [, q, zs, mb]
    N, V, H, split_cols, splits,
    stride_h_n, stride_w_v,  # unit last strides (tma_ok)
    inv_temp, softcap,
    group_n,  # token blocks per group of the work order (tma.grouped_item)
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, EXTRA: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    h_desc, w_desc = operand_descriptors(h_ptr, w_ptr, N, V, H, stride_h_n, stride_w_v, BLOCK_N, BLOCK_V, BLOCK_K)
    n_blocks = tl.cdiv(N, BLOCK_N)
    items = n_blocks * splits
    rows = EXTRA_ROWS if EXTRA else ROWS
    for item in range(tl.program_id(0), items, tl.num_programs(0)):
        pid_n, split = grouped_item(item, n_blocks, splits, group_n)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        y = tl.load(y_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
        m = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
        s = tl.zeros((BLOCK_N,), tl.float32)
        a = tl.zeros((BLOCK_N,), tl.float32)
        zy = tl.zeros((BLOCK_N,), tl.float32)
        q = tl.zeros((BLOCK_N,), tl.float32)
        zs = tl.zeros((BLOCK_N,), tl.float32)
        mb = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
        v_begin = split * split_cols
        v_end = tl.minimum(v_begin + split_cols, V)
        cols = tl.arange(0, BLOCK_V)
        for v0 in range(v_begin, v_end, BLOCK_V):
            r = tma_logits_tile(h_desc, w_desc, pid_n * BLOCK_N, v0, H, INTERPRET, DOT_PRECISION,
                                BLOCK_N, BLOCK_V, BLOCK_K)
            z, _ = transform_tile(r, b_ptr, v0 + cols, V, inv_temp, softcap, HAS_BIAS, SOFTCAP)
            m, s, a, zy, q, zs, mb = lse_tile_update(z, cols, (y - v0).to(tl.int32), v_end - v0,
                                                     m, s, a, zy, q, zs, mb, EXTRA)
        out = stats_ptr + split.to(tl.int64) * rows * N + offs_n
        tl.store(out, m, mask=mask_n)
        tl.store(out + N, s, mask=mask_n)
        tl.store(out + 2 * N, a, mask=mask_n)
        tl.store(out + 3 * N, zy, mask=mask_n)
        if EXTRA:
            tl.store(out + 4 * N, q, mask=mask_n)
            tl.store(out + 5 * N, zs, mask=mask_n)
            tl.store(out + 6 * N, mb, mask=mask_n)


def use_tma(*operands) -> bool:
    """Every operand readable through a tensor descriptor (tma.tma_ok)."""
    return all(tma_ok(t) for t in operands)


def partial_stats(hidden, weight, bias, targets, *, temperature, softcap, chunk_bytes=None, extra=False):
    """Per-split statistics (SPLITS, ROWS, N) fp32, as linear_logps_triton.partial_stats (other split width).
    Operands TMA cannot read go to linear_logps_triton.partial_stats."""
    if not use_tma(hidden, weight):
        return _base.partial_stats(hidden, weight, bias, targets, temperature=temperature, softcap=softcap, extra=extra)
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = persistent_config(H, V, hidden.dtype, extra_stats=extra, arch=target_arch(hidden.device))
    splits = triton.cdiv(V, cfg.split_cols)
    stats = torch.empty((splits, common.stat_rows(extra), N), device=hidden.device, dtype=torch.float32)
    if hidden.is_cuda:
        ensure_allocator()
    items = triton.cdiv(N, cfg.BLOCK_N) * splits
    _logps_fwd_persistent_kernel[(num_programs(hidden.device, items),)](
        hidden, weight, bias.contiguous() if bias is not None else hidden, targets,
        stats,
        N, V, H, cfg.split_cols, splits,
        hidden.stride(0), weight.stride(0),
        1.0 / temperature, float(softcap or 1.0),
        group_n=cfg.group_n,
        HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, EXTRA=extra,
        INTERPRET=interpreting(), DOT_PRECISION=dot_precision(hidden.dtype),
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return stats


def logps_fwd(hidden, weight, bias, targets, *, temperature, softcap, ignore_index, chunk_bytes=None, extra=False):
    """As linear_logps_triton.logps_fwd: (logps, entropy, lse, extras), merged by its `_merge_kernel`."""
    stats = partial_stats(hidden, weight, bias, targets, temperature=temperature, softcap=softcap, extra=extra)
    return _base.merge_stats(stats, targets, ignore_index, weight.shape[0], extra)


logps_bwd_dz = _base.logps_bwd_dz
