"""Exact per-token KL between two linear heads, fused in Triton: neither logits matrix is formed.

Math (one token; heads A and B over the same V, possibly different hidden sizes H_A, H_B):
    a = A-logits, b = B-logits (each h Wᵀ + bias, softcap, / T: tiles.py),  P = softmax(a),  Q = softmax(b)
    KL(P‖Q) = Σ_v P_v (a_v − b_v) − lse_a + lse_b
The kernel accumulates, per vocabulary split, with an online max on each side,
    m_a, s_a = Σ e^{a−m_a},   m_b, s_b = Σ e^{b−m_b},   c = Σ e^{a−m_a} (a − b)
and a fixed-order merge gives lse_a, lse_b and E_P[a − b] = C / S_a. Forward KL(π‖π_ref) runs
with A = policy, B = reference; reverse KL(π_ref‖π) with A = reference, B = policy.

Backward, policy logits z (p = softmax(z), q = softmax(z_ref)), upstream g:
    forward  KL(p‖q):  ∂/∂z_v = g p_v (log p_v − log q_v − KL)
    reverse  KL(q‖p):  ∂/∂z_v = g (p_v − q_v)
written per chunk by `_kl_bwd_dz_kernel`; head_backward.py does the GEMMs.
Memory: O(N) statistics; the backward's (chunk, V) tile is the only large buffer. Both heads' tiles are
live at once, so the tile configuration is the two-head one (`tile_config(..., heads=2)`).
Biases: one HAS_BIAS flag for both heads; a head without bias gets a zero vector (V loads per tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .tiles import NEG_BIG, dot_precision, final_logits_tile, interpreting, store_dz, tile_config, tile_dtype
from .tma import group_blocks, grouped_item

# (chunk, V) buffers the launchers hold besides the backward's dz (see linear_logps_torch.py).
BWD_BYTES_PER_LOGIT = 0
# Rows of the per-split statistics (common.py's layout: m_a, s_a, m_b, s_b, c), as a kernel constant.
KL_ROWS = tl.constexpr(common.KL_ROWS)


@triton.jit
def _kl_fwd_kernel(
    ha_ptr, wa_ptr, ba_ptr, hb_ptr, wb_ptr, bb_ptr,
    stats_ptr,  # (SPLITS, 5, N) fp32: rows m_a, s_a, m_b, s_b, c
    N, V, H_A, H_B, split_cols,
    stride_ha_n, stride_ha_k, stride_wa_v, stride_wa_k,
    stride_hb_n, stride_hb_k, stride_wb_v, stride_wb_k,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr,
    PREC_A: tl.constexpr, PREC_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
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
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = (offs_v < v_end)[None, :]
        a, _ = final_logits_tile(ha_ptr, wa_ptr, ba_ptr, offs_n, offs_v, N, V, H_A,
                                 stride_ha_n, stride_ha_k, stride_wa_v, stride_wa_k, inv_temp, softcap,
                                 HAS_BIAS, SOFTCAP, INTERPRET, PREC_A, BLOCK_N, BLOCK_V, BLOCK_K)
        b, _ = final_logits_tile(hb_ptr, wb_ptr, bb_ptr, offs_n, offs_v, N, V, H_B,
                                 stride_hb_n, stride_hb_k, stride_wb_v, stride_wb_k, inv_temp, softcap,
                                 HAS_BIAS, SOFTCAP, INTERPRET, PREC_B, BLOCK_N, BLOCK_V, BLOCK_K)
        a = tl.where(mask_v, a, float("-inf"))
        b = tl.where(mask_v, b, float("-inf"))
        m_a_new = tl.maximum(m_a, tl.max(a, axis=1))
        alpha = tl.exp(m_a - m_a_new)
        e_a = tl.exp(a - m_a_new[:, None])
        c = alpha * c + tl.sum(tl.where(mask_v, e_a * (a - b), 0.0), axis=1)
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


@triton.jit
def _kl_merge_kernel(stats_ptr, valid_ptr, kl_ptr, lse_a_ptr, lse_b_ptr, N, SPLITS, BLOCK: tl.constexpr):
    """Fixed-order merge of the per-split statistics (deterministic, no atomics)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    M_a = tl.full((BLOCK,), NEG_BIG, tl.float32)
    M_b = tl.full((BLOCK,), NEG_BIG, tl.float32)
    row = stats_ptr + offs  # advanced by KL_ROWS·N per split: 64-bit pointer arithmetic, no int32 product
    for i in range(0, SPLITS):
        M_a = tl.maximum(M_a, tl.load(row, mask=mask, other=NEG_BIG))
        M_b = tl.maximum(M_b, tl.load(row + 2 * N, mask=mask, other=NEG_BIG))
        row += KL_ROWS * N
    S_a = tl.zeros((BLOCK,), tl.float32)
    S_b = tl.zeros((BLOCK,), tl.float32)
    C = tl.zeros((BLOCK,), tl.float32)
    row = stats_ptr + offs
    for i in range(0, SPLITS):
        scale_a = tl.exp(tl.load(row, mask=mask, other=NEG_BIG) - M_a)
        S_a += scale_a * tl.load(row + N, mask=mask, other=0.0)
        C += scale_a * tl.load(row + 4 * N, mask=mask, other=0.0)
        S_b += tl.exp(tl.load(row + 2 * N, mask=mask, other=NEG_BIG) - M_b) * tl.load(row + 3 * N, mask=mask,
                                                                                     other=0.0)
        row += KL_ROWS * N
    lse_a = M_a + tl.log(S_a)
    lse_b = M_b + tl.log(S_b)
    valid = tl.load(valid_ptr + offs, mask=mask, other=0) != 0
    tl.store(kl_ptr + offs, tl.where(valid, C / S_a - lse_a + lse_b, 0.0), mask=mask)
    tl.store(lse_a_ptr + offs, lse_a, mask=mask)
    tl.store(lse_b_ptr + offs, lse_b, mask=mask)


@triton.jit(do_not_specialize=["group_n"])  # group_n orders the work only: one binary for all
def _kl_bwd_dz_kernel(
    h_ptr, w_ptr, b_ptr, hr_ptr, wr_ptr, br_ptr, valid_ptr, lse_ptr, lse_ref_ptr, kl_ptr, g_ptr,
    dz_ptr,  # (N, V) chunk of ∂L/∂r (policy raw logits), input dtype
    N, V, H, H_R,
    stride_h_n, stride_h_k, stride_w_v, stride_w_k,
    stride_hr_n, stride_hr_k, stride_wr_v, stride_wr_k, stride_dz_n,
    inv_temp, softcap,
    group_n,  # token blocks per group of the work order (tma.grouped_item)
    REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr,
    PREC: tl.constexpr, PREC_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program per tile in L2-grouped order, as linear_logps_triton._logps_bwd_dz_kernel.
    pid_n, pid_v = grouped_item(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), group_n)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    valid = mask_n & (tl.load(valid_ptr + offs_n, mask=mask_n, other=0) != 0)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
    z, t = final_logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, H,
                             stride_h_n, stride_h_k, stride_w_v, stride_w_k, inv_temp, softcap,
                             HAS_BIAS, SOFTCAP, INTERPRET, PREC, BLOCK_N, BLOCK_V, BLOCK_K)
    zr, _ = final_logits_tile(hr_ptr, wr_ptr, br_ptr, offs_n, offs_v, N, V, H_R,
                              stride_hr_n, stride_hr_k, stride_wr_v, stride_wr_k, inv_temp, softcap,
                              HAS_BIAS, SOFTCAP, INTERPRET, PREC_R, BLOCK_N, BLOCK_V, BLOCK_K)
    logp = z - tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    logq = zr - tl.load(lse_ref_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    p = tl.exp(logp)
    if REVERSE:
        dz = g[:, None] * (p - tl.exp(logq))
    else:
        kl = tl.load(kl_ptr + offs_n, mask=mask_n, other=0.0)
        dz = g[:, None] * p * (logp - logq - kl[:, None])
    store_dz(dz, t, valid, dz_ptr, offs_n, offs_v, mask_n, mask_v, stride_dz_n, inv_temp, SOFTCAP)


def _biases(V, ba, bb, like_a, like_b):
    """(HAS_BIAS, bias A, bias B): one flag for both heads; a missing bias becomes zeros when the other has one."""
    if ba is None and bb is None:
        return False, like_a, like_b  # unused pointers
    ba = ba.contiguous() if ba is not None else torch.zeros(V, device=like_a.device, dtype=like_a.dtype)
    bb = bb.contiguous() if bb is not None else torch.zeros(V, device=like_b.device, dtype=like_b.dtype)
    return True, ba, bb


def kl_partial_stats(ha, wa, hb, wb, *, bias_a=None, bias_b=None, temperature, softcap, chunk_bytes=None):
    """Per-split statistics (SPLITS, 5, N) fp32 — rows m_a, s_a, m_b, s_b, c — of heads A and B over this
    vocabulary (or vocabulary shard). ha: (N, H_A), wa: (V, H_A), hb: (N, H_B), wb: (V, H_B).
    `chunk_bytes` is accepted for the common launcher signature; the forward holds no (chunk, V) buffer."""
    N, H_A = ha.shape
    V, H_B = wa.shape[0], hb.shape[1]
    cfg = tile_config(max(H_A, H_B), V, tile_dtype(ha.dtype, hb.dtype), heads=2)
    splits = triton.cdiv(V, cfg.split_cols)
    stats = torch.empty((splits, common.KL_ROWS, N), device=ha.device, dtype=torch.float32)
    has_bias, ba, bb = _biases(V, bias_a, bias_b, ha, hb)
    _kl_fwd_kernel[(triton.cdiv(N, cfg.BLOCK_N), splits)](
        ha, wa, ba, hb, wb, bb, stats,
        N, V, H_A, H_B, cfg.split_cols,
        ha.stride(0), ha.stride(1), wa.stride(0), wa.stride(1),
        hb.stride(0), hb.stride(1), wb.stride(0), wb.stride(1),
        1.0 / temperature, float(softcap or 1.0),
        HAS_BIAS=has_bias, SOFTCAP=softcap is not None, INTERPRET=interpreting(),
        PREC_A=dot_precision(ha.dtype), PREC_B=dot_precision(hb.dtype),
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return stats


def kl_fwd(ha, wa, hb, wb, valid, *, bias_a=None, bias_b=None, temperature, softcap, chunk_bytes=None):
    """KL(softmax(A)‖softmax(B)) per token. ha: (N, H_A), wa: (V, H_A), hb: (N, H_B), wb: (V, H_B),
    bias_a, bias_b: (V,) or None, valid: (N,) uint8  ->  kl, lse_a, lse_b: (N,) fp32 (kl = 0 where not valid)."""
    stats = kl_partial_stats(ha, wa, hb, wb, bias_a=bias_a, bias_b=bias_b, temperature=temperature,
                             softcap=softcap)
    return merge_kl_stats(stats, valid)


def merge_kl_stats(stats, valid):
    """stats: (SPLITS, 5, N) fp32 of any split width, valid: (N,) uint8 -> kl, lse_a, lse_b, fixed-order merge."""
    N = valid.shape[0]
    out = [torch.empty(N, device=stats.device, dtype=torch.float32) for _ in range(3)]  # separate: see logps_fwd
    block = 16 if interpreting() else 256
    _kl_merge_kernel[(triton.cdiv(N, block),)](stats, valid, out[0], out[1], out[2], N, stats.shape[0],
                                               BLOCK=block)
    return out[0], out[1], out[2]


def kl_bwd_dz(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, lse, lse_ref, kl, g, dz, *,
              reverse, temperature, softcap):
    """Write ∂L/∂(policy raw logits) for one chunk into `dz: (n, V)`."""
    N, H = hidden.shape
    V, H_R = weight.shape[0], ref_hidden.shape[1]
    cfg = tile_config(max(H, H_R), V, tile_dtype(hidden.dtype, ref_hidden.dtype), heads=2)
    has_bias, b, br = _biases(V, bias, ref_bias, hidden, ref_hidden)
    _kl_bwd_dz_kernel[(triton.cdiv(N, cfg.BLOCK_N) * triton.cdiv(V, cfg.BLOCK_V),)](
        hidden, weight, b, ref_hidden, ref_weight, br, valid, lse, lse_ref, kl, g, dz,
        N, V, H, H_R,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        ref_hidden.stride(0), ref_hidden.stride(1), ref_weight.stride(0), ref_weight.stride(1), dz.stride(0),
        1.0 / temperature, float(softcap or 1.0),
        REVERSE=reverse, HAS_BIAS=has_bias, SOFTCAP=softcap is not None, INTERPRET=interpreting(),
        PREC=dot_precision(hidden.dtype), PREC_R=dot_precision(ref_hidden.dtype),
        group_n=group_blocks(cfg.BLOCK_N, max(H, H_R), 2 * hidden.element_size()),
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dz
