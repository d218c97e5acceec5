"""Fused linear log-probs and entropy in Triton: logits tiles never leave registers.

Math (one token row; z are the final logits, V columns):
    r = h Wᵀ + b                       raw logits, formed in fp32 by `tl.dot`
    c = softcap · tanh(r / softcap)    (optional, Gemma 2)      then  z = c / T
    lse = log Σ_v exp(z_v),   logp = z_y − lse,   entropy = −Σ_v p_v log p_v = −Σ_v p_v (z_v − lse)

Forward: grid (token blocks, vocabulary splits). Each program sweeps its vocabulary split in
BLOCK_V tiles with an online log-sum-exp and writes four per-split partial statistics
    m  = max_v z_v,   s = Σ_v e^{z_v − m},   a = Σ_v e^{z_v − m} (z_v − m),   zy = z_y or 0
which combine exactly across splits (and across tensor-parallel vocabulary shards):
    M = max_i m_i,  S = Σ_i s_i e^{m_i − M},  A = Σ_i e^{m_i − M}(a_i + (m_i − M) s_i)
    lse = M + log S,   entropy = log S − A / S.
Keeping `a` relative to the running max avoids the cancellation of `lse − E_p[z]` at large logits.
With EXTRA (the forward-only statistics TRL's trainers log), three more per split, also exact to merge:
    q  = Σ_v e^{2(z_v − m)}            Q = Σ_i q_i e^{2(m_i − M)}    log Σ_v p_v² = log Q − 2 log S
    zs = Σ_v z_v                      ZS = Σ_i zs_i                 mean_logits = ZS / V
    mb = max_{v < y} z_v (−big if none) MB = max_i mb_i              is_top1 = z_y ≥ M and z_y > MB
(is_top1: y is the *first* argmax, as `torch.argmax` breaks ties.) No gradient flows through them.
A second tiny kernel merges the splits in a fixed sequential order.

Backward (hybrid): given the saved per-token `lse` (and `entropy`), a Triton kernel recomputes a
logit tile and writes the logit gradient in place,
    ∂L/∂z_v = g_logp (1[v = y] − p_v) − g_ent p_v (log p_v + entropy)
    ∂L/∂r_v = ∂L/∂z_v · (1/T) · (1 − tanh²(r_v / softcap))
for a bounded chunk of tokens; cuBLAS then does ∂h = dr W and ∂W += drᵀ h (head_backward.py).
Logit tiles, the softcap/temperature transform and the dz store are shared (tiles.py).

Memory: forward saves nothing but O(N) statistics; the only large buffer is the backward's
`(chunk, V)` gradient tile, bounded by a byte budget.

Batch invariance (forward: logps, entropy, lse — what PPO compares; the backward's GEMMs are cuBLAS and
not claimed invariant): a token's result depends only on its own row — tile shapes and the number of
vocabulary splits are chosen from (H, V, dtype) alone, never from N, and the merge order is fixed —
so the same token gives bitwise-identical log-probs alone or in a batch of thousands.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .tiles import NEG_BIG, dot_precision, final_logits_tile, interpreting, store_dz, tile_config
from .tma import group_blocks, grouped_item

# (chunk, V) buffers the launchers hold besides the backward's dz, bytes per logit (see linear_logps_torch.py).
BWD_BYTES_PER_LOGIT = 0

# Rows of the per-split statistics (common.py's layout: m, s, a, zy, and with EXTRA also q, zs, mb), as the
# compile-time constants a kernel may read.
ROWS = tl.constexpr(common.STAT_ROWS)
EXTRA_ROWS = tl.constexpr(common.EXTRA_STAT_ROWS)


@triton.jit
def _logps_fwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr,
    stats_ptr,  # (SPLITS, ROWS, N) fp32: rows m, s, a, zy [, q, zs, mb]
    N, V, H, split_cols,
    stride_h_n, stride_h_k, stride_w_v, stride_w_k,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, EXTRA: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
    y32 = y.to(tl.int32)  # for the tile-wide compare of mb: int32 columns, not an int64 tile of registers

    m = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    q = tl.zeros((BLOCK_N,), tl.float32)
    zs = tl.zeros((BLOCK_N,), tl.float32)
    mb = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
    v_begin = split * split_cols
    v_end = tl.minimum(v_begin + split_cols, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        z, _ = final_logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, H,
                                 stride_h_n, stride_h_k, stride_w_v, stride_w_k, inv_temp, softcap,
                                 HAS_BIAS, SOFTCAP, INTERPRET, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        # Before masking, and so without a mask: split_cols is a multiple of BLOCK_V, so a tile's columns past
        # v_end lie past V, where the logit tile holds exact zeros (W and b load as 0; softcap(0) = 0). A
        # vocabulary shard's target past its V (kept as is for mb) thus adds 0 to z_y.
        zy += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
        if EXTRA:
            zs += tl.sum(z, axis=1)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        if EXTRA:
            mb = tl.maximum(mb, tl.max(tl.where(offs_v[None, :] < y32[:, None], z, NEG_BIG), axis=1))
        # Online softmax: rescale s and a to the new running max before adding this tile.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        d = m - m_new  # ≤ 0, finite
        alpha = tl.exp(d)
        e = tl.exp(z - m_new[:, None])
        # e = 0 (masked column, or a logit at −inf such as masked vocabulary padding): 0·log 0 = 0.
        a = alpha * (a + d * s) + tl.sum(tl.where(e > 0, e * (z - m_new[:, None]), 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        if EXTRA:
            q = alpha * alpha * q + tl.sum(e * e, axis=1)
        m = m_new
    rows = EXTRA_ROWS if EXTRA else ROWS
    out = stats_ptr + split.to(tl.int64) * rows * N + offs_n
    tl.store(out, m, mask=mask_n)
    tl.store(out + N, s, mask=mask_n)
    tl.store(out + 2 * N, a, mask=mask_n)
    tl.store(out + 3 * N, zy, mask=mask_n)
    if EXTRA:
        tl.store(out + 4 * N, q, mask=mask_n)
        tl.store(out + 5 * N, zs, mask=mask_n)
        tl.store(out + 6 * N, mb, mask=mask_n)


@triton.jit
def _merge_kernel(
    stats_ptr, y_ptr,  # stats: (SPLITS, ROWS, N) fp32, rows m, s, a, zy [, q, zs, mb]
    logps_ptr, entropy_ptr, lse_ptr,
    lssp_ptr, mean_ptr, top1_ptr,  # with EXTRA: log Σ p², mean logit (fp32), is_top1 (uint8)
    N, SPLITS, ignore_index, inv_V,
    EXTRA: tl.constexpr, BLOCK: tl.constexpr,
):
    """Combine per-split statistics in a fixed order (deterministic, no atomics)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    rows = EXTRA_ROWS if EXTRA else ROWS
    # Rows advance by pointer increments of ROWS·N (64-bit pointers): no int32 product of split and N.
    M = tl.full((BLOCK,), NEG_BIG, tl.float32)
    row = stats_ptr + offs
    for i in range(0, SPLITS):
        M = tl.maximum(M, tl.load(row, mask=mask, other=NEG_BIG))
        row += rows * N
    S = tl.zeros((BLOCK,), tl.float32)
    A = tl.zeros((BLOCK,), tl.float32)
    ZY = tl.zeros((BLOCK,), tl.float32)
    Q = tl.zeros((BLOCK,), tl.float32)
    ZS = tl.zeros((BLOCK,), tl.float32)
    MB = tl.full((BLOCK,), NEG_BIG, tl.float32)
    row = stats_ptr + offs
    for i in range(0, SPLITS):
        m_i = tl.load(row, mask=mask, other=NEG_BIG)
        s_i = tl.load(row + N, mask=mask, other=0.0)
        d = m_i - M
        scale = tl.exp(d)
        S += s_i * scale
        A += scale * (tl.load(row + 2 * N, mask=mask, other=0.0) + d * s_i)
        ZY += tl.load(row + 3 * N, mask=mask, other=0.0)
        if EXTRA:
            Q += scale * scale * tl.load(row + 4 * N, mask=mask, other=0.0)
            ZS += tl.load(row + 5 * N, mask=mask, other=0.0)
            MB = tl.maximum(MB, tl.load(row + 6 * N, mask=mask, other=NEG_BIG))
        row += rows * N
    log_s = tl.log(S)
    lse = M + log_s
    valid = tl.load(y_ptr + offs, mask=mask, other=ignore_index) != ignore_index
    tl.store(logps_ptr + offs, tl.where(valid, ZY - lse, 0.0), mask=mask)
    tl.store(entropy_ptr + offs, tl.where(valid, log_s - A / S, 0.0), mask=mask)
    tl.store(lse_ptr + offs, lse, mask=mask)
    if EXTRA:
        tl.store(lssp_ptr + offs, tl.where(valid, tl.log(Q) - 2.0 * log_s, 0.0), mask=mask)
        tl.store(mean_ptr + offs, tl.where(valid, ZS * inv_V, 0.0), mask=mask)
        top1 = valid & (ZY >= M) & (ZY > MB)
        tl.store(top1_ptr + offs, top1.to(tl.uint8), mask=mask)


@triton.jit(do_not_specialize=["group_n"])  # group_n orders the work only: one binary for all
def _logps_bwd_dz_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
    dz_ptr,  # (N, V) chunk of ∂L/∂r, in the input dtype
    N, V, H, ignore_index,
    stride_h_n, stride_h_k, stride_w_v, stride_w_k, stride_dz_n,
    inv_temp, softcap,
    group_n,  # token blocks per group of the work order (tma.grouped_item)
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ENT_GRAD: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program per tile, in groups of group_n token blocks (tma.grouped_item): the tiles in flight share
    # their h and W tiles in L2 (token block fastest over all N rows re-read every h tile from DRAM per column).
    pid_n, pid_v = grouped_item(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), group_n)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=ignore_index).to(tl.int64)
    valid = mask_n & (y != ignore_index)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g_logp = tl.load(g_logp_ptr + offs_n, mask=mask_n, other=0.0)

    z, t = final_logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, H,
                             stride_h_n, stride_h_k, stride_w_v, stride_w_k, inv_temp, softcap,
                             HAS_BIAS, SOFTCAP, INTERPRET, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    if HAS_ENT_GRAD:
        # −p (g + e (log p + H)) as one product: one tile fewer live than two separate terms, which
        # spilled on sm_90. p = 0 (a logit at −inf) contributes 0, not 0·(−inf).
        ent = tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0)
        g_ent = tl.load(g_ent_ptr + offs_n, mask=mask_n, other=0.0)
        dz = tl.where(p > 0, -p * (g_logp[:, None] + g_ent[:, None] * (logp + ent[:, None])), 0.0)
    else:
        dz = -g_logp[:, None] * p
    dz += tl.where(offs_v[None, :] == y[:, None], g_logp[:, None], 0.0)
    store_dz(dz, t, valid, dz_ptr, offs_n, offs_v, mask_n, mask_v, stride_dz_n, inv_temp, SOFTCAP)


def partial_stats(hidden, weight, bias, targets, *, temperature, softcap, chunk_bytes=None, extra=False):
    """Per-split statistics (SPLITS, ROWS, N) fp32 — rows m, s, a, zy, and with `extra` q, zs, mb — for
    targets in [0, V) (else zy = 0; mb compares column indices with the target, whatever its range).

    `chunk_bytes` is accepted for the common launcher signature; the forward holds no (chunk, V) buffer."""
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = tile_config(H, V, hidden.dtype, extra_stats=extra)
    splits = triton.cdiv(V, cfg.split_cols)
    stats = torch.empty((splits, common.stat_rows(extra), N), device=hidden.device, dtype=torch.float32)
    _logps_fwd_kernel[(triton.cdiv(N, cfg.BLOCK_N), splits)](
        hidden, weight, bias.contiguous() if bias is not None else hidden, targets,
        stats,
        N, V, H, cfg.split_cols,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 / temperature, float(softcap or 1.0),
        HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, EXTRA=extra, INTERPRET=interpreting(),
        DOT_PRECISION=dot_precision(hidden.dtype),
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return stats


def logps_fwd(hidden, weight, bias, targets, *, temperature, softcap, ignore_index, chunk_bytes=None, extra=False):
    """hidden: (N, H), weight: (V, H), bias: (V,)|None, targets: (N,) -> (logps, entropy, lse, extras):
    (N,) fp32 each; extras = (log_sum_sq_probs, mean_logits fp32, is_top1 bool) with `extra`, else None."""
    stats = partial_stats(hidden, weight, bias, targets, temperature=temperature, softcap=softcap, extra=extra)
    return merge_stats(stats, targets, ignore_index, weight.shape[0], extra)


def merge_stats(stats, targets, ignore_index, V, extra=False):
    """stats: (SPLITS, ROWS, N) fp32 of any split width -> (logps, entropy, lse, extras), fixed-order merge."""
    N, dev = targets.shape[0], stats.device
    # Separate tensors, not views of one: `lse` is saved for backward while callers may edit logps in place.
    out = [torch.empty(N, device=dev, dtype=torch.float32) for _ in range(5 if extra else 3)]
    top1 = torch.empty(N, device=dev, dtype=torch.uint8) if extra else out[0]
    lssp, mean = (out[3], out[4]) if extra else (out[0], out[0])  # unused pointers without EXTRA
    block = 16 if interpreting() else 256
    _merge_kernel[(triton.cdiv(N, block),)](
        stats, targets, out[0], out[1], out[2], lssp, mean, top1,
        N, stats.shape[0], ignore_index, 1.0 / V,
        EXTRA=extra, BLOCK=block,
    )
    extras = (lssp, mean, top1.view(torch.bool)) if extra else None
    return out[0], out[1], out[2], extras


def logps_bwd_dz(hidden, weight, bias, targets, lse, entropy, g_logps, g_entropy, dz, *,
                 temperature, softcap, ignore_index):
    """Write ∂L/∂(raw logits) for a chunk into `dz: (N, V)`; inputs are that chunk's rows."""
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = tile_config(H, V, hidden.dtype)
    has_ent = g_entropy is not None
    _logps_bwd_dz_kernel[(triton.cdiv(N, cfg.BLOCK_N) * triton.cdiv(V, cfg.BLOCK_V),)](
        hidden, weight, bias.contiguous() if bias is not None else hidden, targets, lse,
        entropy if has_ent else lse, g_logps, g_entropy if has_ent else g_logps,
        dz,
        N, V, H, ignore_index,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
        1.0 / temperature, float(softcap or 1.0),
        HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, HAS_ENT_GRAD=has_ent,
        INTERPRET=interpreting(), DOT_PRECISION=dot_precision(hidden.dtype),
        group_n=group_blocks(cfg.BLOCK_N, H, hidden.element_size()),
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dz
