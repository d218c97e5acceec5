"""Chunked PyTorch backend of the exact two-head KL: same math as linear_kl_triton.py, same bound.

Each token chunk forms both heads' fp32 logits, each with `torch.mm(..., out=)` into a workspace allocated
once per call; chunks are sized so that every (chunk, V) buffer alive at once fits `chunk_bytes` (two fp32
tiles in forward, the reference's tile beside head_backward's ∂r buffer in backward), and the softmax
epilogue runs in place slab by slab (chunked.py). Nothing (N, V). With `keep=True` a forward whose two
tiles fitted one chunk hands them back, so that the backward needs no logit GEMM (see linear_kl.py).
Every row statistic is a cascaded `sum` (never a `bmm` dot product: its fp32 error grows with V).
"""

from __future__ import annotations

import torch

from .chunked import (LogitMap, autocast_off, chunk_rows, finish_logits_, head_weight, mm_into, scratch, slab_rows,
                      slabs, softcap_factor_from_logits)
from .common import KL_ROWS

FWD_BYTES_PER_LOGIT = 8  # both heads' logit tiles (exponentials and products go to two O(V) scratch slabs)
# Besides head_backward's ∂r buffer: the reference's fp32 tile, and the policy's fp32 tile when that buffer is
# low precision (CUDA fallback). The constant is the worst case; head_backward asks `bwd_bytes_per_logit`.
BWD_BYTES_PER_LOGIT = 8
_LOWEST = torch.finfo(torch.float32).min


def bwd_bytes_per_logit(dz_dtype: torch.dtype) -> int:
    """Bytes per logit kl_bwd_dz holds besides a `dz_dtype` ∂r buffer."""
    return 4 if dz_dtype == torch.float32 else 8


@autocast_off
def kl_partial_stats(ha, wa, hb, wb, *, bias_a=None, bias_b=None, temperature, softcap, chunk_bytes, keep=False):
    """Statistics (1, 5, N) fp32 over this head's vocabulary (or vocabulary shard), as the Triton kernel's:
    rows m_a = max a, s_a = Σ e^{a−m_a}, m_b, s_b likewise, c = Σ e^{a−m_a} (a − b) (unshifted a − b).

    With `keep=True` returns (stats, (A, B)): the two (N, V) fp32 final-logit tiles when all N rows fitted
    one chunk, else (stats, None)."""
    N, V = ha.shape[0], wa.shape[0]
    dev = ha.device
    stats = torch.empty((1, KL_ROWS, N), device=dev, dtype=torch.float32)
    step = chunk_rows(N, V, chunk_bytes, FWD_BYTES_PER_LOGIT)
    Wa, Wb = head_weight(wa), head_weight(wb)
    la, lb = LogitMap(bias_a, temperature, softcap, dev), LogitMap(bias_b, temperature, softcap, dev)
    rows0 = min(step, N)
    ws_a = torch.empty((rows0, V), device=dev, dtype=torch.float32)
    ws_b = torch.empty((rows0, V), device=dev, dtype=torch.float32)
    k_slab = slab_rows(V, rows0)
    d, e = scratch(k_slab, V, dev, 2)
    for start in range(0, N, step):
        rows = slice(start, min(N, start + step))
        n = rows.stop - rows.start
        A = mm_into(ws_a[:n], ha[rows], Wa, la.alpha)
        B = mm_into(ws_b[:n], hb[rows], Wb, lb.alpha)
        st = stats[0, :, rows]
        for r in slabs(n, k_slab):
            a = finish_logits_(A[r], la)
            b = finish_logits_(B[r], lb)
            k = a.shape[0]
            torch.amax(b, -1, out=st[2, r])
            torch.sum(torch.sub(b, st[2, r].unsqueeze(1), out=d[:k]).exp_(), -1, out=st[3, r])
            torch.amax(a, -1, out=st[0, r])
            ek = torch.sub(a, st[0, r].unsqueeze(1), out=d[:k]).exp_()
            torch.sum(ek, -1, out=st[1, r])
            # Σ e (a − b) of the unshifted logits: the difference, the products, then a cascaded sum.
            # Where a = −inf (a −inf-masked padded vocabulary) e = 0 and e·(a − b) is 0·(±inf or NaN): that term
            # is 0 (issue 30). In place on the slab; a NaN input still reaches s_a, and so the KL.
            torch.sum(torch.sub(a, b, out=e[:k]).mul_(ek).nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf")), -1, out=st[4, r])
    if keep:
        return stats, ((ws_a, ws_b) if step >= N else None)
    return stats


def kl_combine_stats(stats, valid):
    """stats: (P, 5, N) from any mix of vocabulary splits/shards -> kl, lse_a, lse_b: (N,) fp32.

    M_a = max m_a,i, S_a = Σ s_a,i e^{m_a,i − M_a}, C = Σ c_i e^{m_a,i − M_a} (and S_b, M_b alike);
    lse = M + log S,  KL = C / S_a − lse_a + lse_b. Merged in a fixed order (deterministic)."""
    M_a, M_b = stats[:, 0].amax(0), stats[:, 2].amax(0)
    S_a, S_b, C = torch.zeros_like(M_a), torch.zeros_like(M_a), torch.zeros_like(M_a)
    for i in range(stats.shape[0]):
        scale_a = (stats[i, 0] - M_a).exp()
        S_a += scale_a * stats[i, 1]
        C += scale_a * stats[i, 4]
        S_b += (stats[i, 2] - M_b).exp() * stats[i, 3]
    lse_a, lse_b = M_a + S_a.log(), M_b + S_b.log()
    return torch.where(valid != 0, C / S_a - lse_a + lse_b, 0.0), lse_a, lse_b


def kl_fwd(ha, wa, hb, wb, valid, *, bias_a=None, bias_b=None, temperature, softcap, chunk_bytes, keep=False):
    """KL(softmax(A)‖softmax(B)) per token -> kl, lse_a, lse_b: (N,) fp32 (kl = 0 where not valid); with
    `keep=True` a 4th element, the kept (A, B) tiles or None (see kl_partial_stats)."""
    out = kl_partial_stats(ha, wa, hb, wb, bias_a=bias_a, bias_b=bias_b, temperature=temperature,
                           softcap=softcap, chunk_bytes=chunk_bytes, keep=keep)
    stats, tiles = out if keep else (out, None)
    result = kl_combine_stats(stats, valid)
    return result + (tiles,) if keep else result


@autocast_off
def kl_bwd_dz(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, lse, lse_ref, kl, g, dz, *,
              reverse, temperature, softcap, logits_in_dz=False, ref_logits=None):
    """Write ∂L/∂(policy raw logits) for one chunk into `dz: (n, V)`; see linear_kl_triton.py.

    The policy's logits are formed in `dz` itself when it is fp32, the reference's in one fp32 tile
    (`bwd_bytes_per_logit`); then, slab by slab, in place:
        forward KL: ∂z = p (log p − log q − KL),   reverse: ∂z = p − q;   ∂r = g ∂z (1 − t²) / T
    `weight` / `ref_weight` should be the call's `head_weight`s; `ref_logits`, an fp32 (≥ n, V) buffer the
    caller reuses across chunks for the reference's logits. With `logits_in_dz` (the forward's kept tiles), dz
    already holds the policy's final logits and `ref_logits` the reference's: no GEMM.
    """
    n, V = dz.shape
    dev = dz.device
    kept = logits_in_dz
    out = dz if dz.dtype == torch.float32 else torch.empty((n, V), device=dev, dtype=torch.float32)
    lp, lq = LogitMap(bias, temperature, softcap, dev), LogitMap(ref_bias, temperature, softcap, dev)
    if kept:
        Q = ref_logits[:n]
        if out is not dz:
            out.copy_(dz)
    else:
        mm_into(out, hidden, head_weight(weight), lp.alpha)
        Q = torch.empty((n, V), device=dev, dtype=torch.float32) if ref_logits is None else ref_logits[:n]
        mm_into(Q, ref_hidden, head_weight(ref_weight), lq.alpha)
    gv = (torch.where(valid != 0, g, 0.0) / temperature).unsqueeze(1)  # with the 1/T of ∂r = ∂z / T
    k_slab = slab_rows(V, n)
    p, factor = scratch(k_slab, V, dev, 2 if softcap is not None else 1) + [None] * (softcap is None)
    for r in slabs(n, k_slab):
        x, q = out[r], Q[r]
        k = x.shape[0]
        f = None if factor is None else factor[:k]
        if kept:
            if f is not None:
                softcap_factor_from_logits(x, lp, f)
        else:
            finish_logits_(x, lp, factor_out=f)
            finish_logits_(q, lq)
        x.sub_(lse[r].unsqueeze(1))  # log p
        if reverse:
            torch.sub(q, lse_ref[r].unsqueeze(1), out=p[:k]).exp_()  # q
            x.exp_().sub_(p[:k]).mul_(gv[r])  # g (p − q) / T
        else:
            # g (log p − log q − KL) / T, then times p
            d = torch.sub(x, q, out=p[:k]).add_((lse_ref[r] - kl[r]).unsqueeze(1)).mul_(gv[r])
            # p = 0 where z = −inf: 0·(−inf or NaN) is that term's 0 (issue 30); a NaN input still reaches p.
            x.exp_().mul_(d).nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
        if f is not None:
            x.mul_(f)
    from .linear_logps_torch import zero_rows_

    zero_rows_(out, valid == 0)  # masked rows: exactly nothing, even if NaN
    return dz if out is dz else dz.copy_(out)
