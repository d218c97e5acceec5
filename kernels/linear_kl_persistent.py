"""Candidate "persistent" for the exact two-head KL forward: persistent grid, grouped order, TMA tiles.

Same math and per-split statistics as linear_kl_triton.py (rows m_a, s_a, m_b, s_b, c; merged by its
`_kl_merge_kernel`):
    m_a = max a,  s_a = Σ e^{a−m_a},  m_b = max b,  s_b = Σ e^{b−m_b},  c = Σ e^{a−m_a} (a − b)
driven as linear_logps_persistent.py drives the log-prob forward: min(#SMs, #items) programs walk the
work items (token block, vocabulary split) in tma.grouped_item's order, both heads' h and W tiles
through tensor descriptors (operands TMA cannot read take the default kernel). Both heads' (BLOCK_N, BLOCK_V) accumulators are
live at once, so the tile is 128 × 128 on sm_90 (two m64n128 accumulators: 128 registers) and 128 × 64
on sm_80 (persistent_config(heads=2)).
Where both heads' logits are −inf (a vocabulary padded by a −inf bias) e_a = 0 and a − b is NaN: the
term is guarded (`e_a > 0`), as the log-prob kernel guards 0·log 0.
Mixed dtypes (a bf16 policy with an fp32 reference): the tile configuration is the fp32 one when either
head is fp32 (a bf16 tile choice spilled with an fp32 head; issue 30), each head's dot keeps its own
precision.
Batch invariance: tile shapes from (H, V, dtypes) only; an item's statistics do not depend on which
program computes it; the merge order is fixed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from . import linear_kl_triton as _base
from .linear_logps_persistent import num_programs, persistent_config, use_tma
from .tiles import NEG_BIG, dot_precision, interpreting, tile_dtype
from .tma import ensure_allocator, grouped_item, operand_descriptors, target_arch, tma_logits_tile, transform_tile

FWD_BYTES_PER_LOGIT = 0
BWD_BYTES_PER_LOGIT = _base.BWD_BYTES_PER_LOGIT
KL_ROWS = _base.KL_ROWS  # kernel constant (common.py's layout)


@triton.jit(do_not_specialize=["group_n"])  # group_n orders the work only: one binary for all
def _kl_fwd_persistent_kernel(
    ha_ptr, wa_ptr, ba_ptr, hb_ptr, wb_ptr, bb_ptr,
    stats_ptr,  # (SPLITS, 5, N) fp32: rows m_a, s_a, m_b, s_b, c
    N, V, H_A, H_B, split_cols, splits,
    stride_ha_n, stride_wa_v, stride_hb_n, stride_wb_v,  # unit last strides (tma_ok)
    inv_temp, softcap,
    group_n,  # token blocks per group of the work order (tma.grouped_item)
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr,
    PREC_A: tl.constexpr, PREC_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    ha_desc, wa_desc = operand_descriptors(ha_ptr, wa_ptr, N, V, H_A, stride_ha_n, stride_wa_v, BLOCK_N, BLOCK_V, BLOCK_K)
    hb_desc, wb_desc = operand_descriptors(hb_ptr, wb_ptr, N, V, H_B, stride_hb_n, stride_wb_v, BLOCK_N, BLOCK_V, BLOCK_K)
    n_blocks = tl.cdiv(N, BLOCK_N)
    items = n_blocks * splits
    cols = tl.arange(0, BLOCK_V)
    for item in range(tl.program_id(0), items, tl.num_programs(0)):
        pid_n, split = grouped_item(item, n_blocks, splits, group_n)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        m_a = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
        m_b = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
        s_a = tl.zeros((BLOCK_N,), tl.float32)
        s_b = tl.zeros((BLOCK_N,), tl.float32)
        c = tl.zeros((BLOCK_N,), tl.float32)
        v_begin = split * split_cols
        v_end = tl.minimum(v_begin + split_cols, V)
        for v0 in range(v_begin, v_end, BLOCK_V):
            valid_v = (cols < v_end - v0)[None, :]
            ra = tma_logits_tile(ha_desc, wa_desc, pid_n * BLOCK_N, v0, H_A, INTERPRET, PREC_A, BLOCK_N, BLOCK_V, BLOCK_K)
            a, _ = transform_tile(ra, ba_ptr, v0 + cols, V, inv_temp, softcap, HAS_BIAS, SOFTCAP)
            a = tl.where(valid_v, a, float("-inf"))
            rb = tma_logits_tile(hb_desc, wb_desc, pid_n * BLOCK_N, v0, H_B, INTERPRET, PREC_B, BLOCK_N, BLOCK_V, BLOCK_K)
            b, _ = transform_tile(rb, bb_ptr, v0 + cols, V, inv_temp, softcap, HAS_BIAS, SOFTCAP)
            b = tl.where(valid_v, b, float("-inf"))
            m_a_new = tl.maximum(m_a, tl.max(a, axis=1))
            alpha = tl.exp(m_a - m_a_new)
            e_a = tl.exp(a - m_a_new[:, None])
            # e_a = 0 covers masked columns and −inf logits; where both heads are −inf, a − b is NaN.
            c = alpha * c + tl.sum(tl.where(e_a > 0, e_a * (a - b), 0.0), axis=1)
            s_a = alpha * s_a + tl.sum(e_a, axis=1)
            m_a = m_a_new
            m_b_new = tl.maximum(m_b, tl.max(b, axis=1))
            s_b = tl.exp(m_b - m_b_new) * s_b + tl.sum(tl.exp(b - m_b_new[:, None]), axis=1)
            m_b = m_b_new
        out = stats_ptr + split.to(tl.int64) * KL_ROWS * N + offs_n
        tl.store(out, m_a, mask=mask_n)
        tl.store(out + N, s_a, mask=mask_n)
        tl.store(out + 2 * N, m_b, mask=mask_n)
        tl.store(out + 3 * N, s_b, mask=mask_n)
        tl.store(out + 4 * N, c, mask=mask_n)


def kl_partial_stats(ha, wa, hb, wb, *, bias_a=None, bias_b=None, temperature, softcap, chunk_bytes=None):
    """Per-split statistics (SPLITS, 5, N) fp32, as linear_kl_triton.kl_partial_stats (other split width)."""
    if not use_tma(ha, wa, hb, wb):  # operands TMA cannot read: the default kernel
        return _base.kl_partial_stats(ha, wa, hb, wb, bias_a=bias_a, bias_b=bias_b, temperature=temperature,
                                      softcap=softcap)
    N, H_A = ha.shape
    V, H_B = wa.shape[0], hb.shape[1]
    cfg = persistent_config(max(H_A, H_B), V, tile_dtype(ha.dtype, hb.dtype), heads=2, arch=target_arch(ha.device))
    splits = triton.cdiv(V, cfg.split_cols)
    stats = torch.empty((splits, common.KL_ROWS, N), device=ha.device, dtype=torch.float32)
    has_bias, ba, bb = _base._biases(V, bias_a, bias_b, ha, hb)
    if ha.is_cuda:
        ensure_allocator()
    items = triton.cdiv(N, cfg.BLOCK_N) * splits
    _kl_fwd_persistent_kernel[(num_programs(ha.device, items),)](
        ha, wa, ba, hb, wb, bb, stats,
        N, V, H_A, H_B, cfg.split_cols, splits,
        ha.stride(0), wa.stride(0), hb.stride(0), wb.stride(0),
        1.0 / temperature, float(softcap or 1.0),
        group_n=cfg.group_n,
        HAS_BIAS=has_bias, SOFTCAP=softcap is not None, INTERPRET=interpreting(),
        PREC_A=dot_precision(ha.dtype), PREC_B=dot_precision(hb.dtype),
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return stats


def kl_fwd(ha, wa, hb, wb, valid, *, bias_a=None, bias_b=None, temperature, softcap, chunk_bytes=None):
    """As linear_kl_triton.kl_fwd: kl, lse_a, lse_b: (N,) fp32, merged by its `_kl_merge_kernel`."""
    stats = kl_partial_stats(ha, wa, hb, wb, bias_a=bias_a, bias_b=bias_b, temperature=temperature, softcap=softcap)
    return _base.merge_kl_stats(stats, valid)


kl_bwd_dz = _base.kl_bwd_dz
