"""Chunked pure-PyTorch backend of the fused linear log-probs: same math, same memory bound.

Same equations as linear_logps_triton.py. Tokens are processed in chunks sized so that every
(chunk, V) buffer alive at once fits the byte budget `chunk_bytes` (default 256 MiB): each function
below states how many bytes per logit it holds (`*_BYTES_PER_LOGIT`), and `chunk_rows` divides the
budget by that. Peak extra memory is therefore ≤ chunk_bytes plus O(N) statistics and two O(V) scratch
slabs — never (N, V). Runs anywhere PyTorch runs; used on the CPU and as the fallback.

How it is fast (issue 23; chunked.py): one fp32 workspace per call that `torch.mm(..., out=)` fills chunk
after chunk; the softmax epilogue in place, slab by slab (rows that stay in cache), computing only the
statistics asked for (`entropy=False`: no Σ e (z − m); `extra`: TRL's three); the backward forms ∂logits
in head_backward.py's own ∂r buffer (no second tile, no copy) and zeroes ignored rows by index, not with a
pass over the tile. With `keep=True` a forward whose tile fitted one chunk hands the tile (the final
logits) back, so that the backward forms ∂logits from it without recomputing the logits (3 GEMMs, not 4).

Accuracy: every row statistic is a `sum` over a contiguous row — PyTorch's CPU reduction is cascaded
(pairwise-like, error O(log V · ε)) — never a `bmm` dot product, whose fp32 error grows with V (Σ e (z − m)
through `bmm` made the entropy 10× less accurate than naive fp32 at V = 128k). Σ z (mean_logits) is
accumulated in float64. log-probs are (z_y − m) − log s, as `log_softmax` forms them (never z_y − lse with
lse rounded at the logits' magnitude). Tested against naive fp32 and float64 up to V = 262,144
(tests/kernels/test_linear_logps_accuracy.py).

Logits are always formed in fp32 (chunked.py: `mm_into`, `finish_logits_`).
"""

from __future__ import annotations

import torch

from .chunked import (LogitMap, autocast_off, chunk_rows, finish_logits_, head_weight, mm_into, scratch, slab_rows,
                      slabs, softcap_factor_from_logits)
from .common import EXTRA_STAT_ROWS, stat_rows

# (chunk, V) buffers alive at once, in bytes per logit (fp32 tiles are 4). Besides them: at most two (slab, V)
# fp32 scratch slabs (chunked.slab_rows: ≤ 1/16 of the chunk's rows each, one row at least) and O(N) statistics.
FWD_BYTES_PER_LOGIT = 4  # partial_stats: the logit tile (exponentials and products go to the scratch slabs)
FWD_EXTRA_BYTES_PER_LOGIT = 4  # the extra statistics' masks are slab-sized too
# logps_bwd_dz forms ∂r in head_backward's buffer itself: nothing more when that buffer is fp32 (CPU, fp32
# CUDA); an fp32 logit tile when it is low precision (bf16/fp16 on CUDA, the fallback path). The constant is
# the worst case; head_backward asks `bwd_bytes_per_logit(dz dtype)`.
BWD_BYTES_PER_LOGIT = 4
# −inf logits (masked vocabulary) are clamped to the lowest finite float before they multiply a zero
# probability, so 0·log 0 = 0 without a (chunk, V) bool mask; NaN passes through clamp unchanged.
_LOWEST = torch.finfo(torch.float32).min


def bwd_bytes_per_logit(dz_dtype: torch.dtype) -> int:
    """Bytes per logit logps_bwd_dz holds besides a `dz_dtype` ∂r buffer."""
    return 0 if dz_dtype == torch.float32 else 4


@autocast_off
def partial_stats(hidden, weight, bias, targets, *, temperature, softcap, chunk_bytes, extra=False, entropy=True,
                  keep=False):
    """Statistics (1, ROWS, N) fp32 — rows m, s, a, zy, and with `extra` q, zs, mb, as in
    linear_logps_triton.py — over this weight's vocabulary; zy = 0 for targets outside [0, V) (ignored, or
    owned by another vocabulary shard); mb compares column indices with the target whatever its range.

    `entropy=False` leaves row a (Σ e (z − m)) NaN: it is not computed. With `keep=True` returns
    (stats, kept): when all N rows fitted one chunk, kept = Kept(tile, shift) with tile the (N, V) fp32 final
    logits z — or, without entropy and softcap (a backward that needs only p), e = exp(z − m) with shift = m
    (N,), so that the backward's p = e·e^{m − lse} costs one pass — else None.
    """
    N = hidden.shape[0]
    V = weight.shape[0]
    dev = hidden.device
    stats = torch.empty((1, stat_rows(extra), N), device=dev, dtype=torch.float32)
    if not entropy:
        stats[0, 2] = float("nan")
    step = chunk_rows(N, V, chunk_bytes, FWD_EXTRA_BYTES_PER_LOGIT if extra else FWD_BYTES_PER_LOGIT)
    W = head_weight(weight)  # one upcast per call for a low-precision weight on the CPU
    lm = LogitMap(bias, temperature, softcap, dev)
    ws = torch.empty((min(step, N), V), device=dev, dtype=torch.float32)  # the one logit workspace
    k_slab = slab_rows(V, min(step, N))
    shifted, prod = scratch(k_slab, V, dev, 2)
    cols = torch.arange(V, device=dev) if extra else None
    neg_inf = torch.full((), -torch.inf, device=dev) if extra else None
    keep_exp = keep and step >= N and not entropy and softcap is None  # the tile ends as e = exp(z − m)
    for start in range(0, N, step):
        sl = slice(start, min(N, start + step))
        n = sl.stop - sl.start
        z = mm_into(ws[:n], hidden[sl], W, lm.alpha)  # (n, V) products, then the final logits in place, by slab
        y = targets[sl]
        y_col = y.clamp(0, V - 1).long().unsqueeze(1)
        st = stats[0, :, sl]  # (ROWS, n) view
        for r in slabs(n, k_slab):
            x = finish_logits_(z[r], lm)  # (k, V), stays the final logits z (unless keep_exp)
            k = x.shape[0]
            st[3, r] = x.gather(1, y_col[r]).squeeze(1)
            if extra:  # from the unshifted logits, so that z_y and max_{v<y} z_v compare exactly
                st[5, r] = x.sum(-1, dtype=torch.float64)
                torch.where(cols < y[r].unsqueeze(1), x, neg_inf, out=prod[:k])
                torch.amax(prod[:k], -1, out=st[6, r])
            # Shifted by the row max, as the Triton kernel does: a row holding ±inf or NaN gives NaN
            # (inf − inf), never a finite number.
            torch.amax(x, -1, out=st[0, r])
            if keep_exp:
                e = x.sub_(st[0, r].unsqueeze(1)).exp_()
                torch.sum(e, -1, out=st[1, r])
                if extra:
                    torch.sum(torch.mul(e, e, out=prod[:k]), -1, out=st[4, r])
                continue
            d = torch.sub(x, st[0, r].unsqueeze(1), out=shifted[:k])  # z − m
            if entropy:
                if lm.minus_inf:
                    d.clamp_(min=_LOWEST)  # 0·log 0 = 0 for logits at −inf (NaN rows keep NaN)
                e = torch.exp(d, out=prod[:k])
                torch.sum(e, -1, out=st[1, r])
                torch.sum(d.mul_(e), -1, out=st[2, r])  # Σ e (z − m): products, then a cascaded sum
            else:
                e = d.exp_()
                torch.sum(e, -1, out=st[1, r])
            if extra:
                torch.sum(e.square_(), -1, out=st[4, r])
        st[3] = torch.where((y >= 0) & (y < V), st[3], 0.0)
        if entropy and not lm.minus_inf and dev.type == "cpu":
            _repair_minus_inf_rows(z, st)
    if keep:
        kept = None
        if step >= N:
            kept = Kept(ws, stats[0, 0].clone() if keep_exp else None)
        return stats, kept
    return stats


class Kept:
    """A forward's (N, V) fp32 tile kept for the backward: the final logits z (shift None), or e = exp(z − shift)."""

    def __init__(self, tile: torch.Tensor, shift=None):
        self.tile, self.shift = tile, shift


def _repair_minus_inf_rows(z, st):
    """Rows whose Σ e (z − m) came out NaN although m and s are finite hold a −inf logit the bias did not
    announce (an infinite weight or hidden entry): 0·(−inf). Recomputed with the clamp, from the kept logits —
    an O(n) check per chunk; the rows themselves only where it fires (on the CPU; elsewhere the clamp runs)."""
    bad = torch.isnan(st[2]) & torch.isfinite(st[0]) & torch.isfinite(st[1])
    if not bad.any():
        return
    idx = bad.nonzero().squeeze(1)
    d = (z[idx] - st[0, idx].unsqueeze(1)).clamp_(min=_LOWEST)
    st[2, idx] = (d * d.exp()).sum(-1)


def combine_stats(stats, targets, ignore_index, vocab_size=None):
    """stats: (P, ROWS, N) from any mix of vocabulary splits/shards -> (logps, entropy, lse, extras).

    M = max m_i, S = Σ s_i e^{m_i−M}, A = Σ e^{m_i−M}(a_i + (m_i − M) s_i); lse = M + log S,
    logps = (z_y − M) − log S, entropy = log S − A/S. With the extra rows (ROWS = 7; `vocab_size` = the whole
    head's V), extras = (log_sum_sq_probs = log Q − 2 log S with Q = Σ q_i e^{2(m_i−M)}, mean_logits =
    Σ zs_i / V, is_top1 = z_y ≥ M and z_y > max_i mb_i), else None. Merged in a fixed order: deterministic
    whatever P is. (z_y − M) is formed before log S is subtracted, as `log_softmax` does: z_y − lse would round
    lse at the logits' magnitude first.
    """
    extra = stats.shape[1] == EXTRA_STAT_ROWS
    if extra and vocab_size is None:
        raise ValueError("combine_stats needs vocab_size (the whole head's V) for mean_logits")
    M = stats[:, 0].amax(0)
    S = torch.zeros_like(M)
    A = torch.zeros_like(M)
    Q = torch.zeros_like(M)
    for i in range(stats.shape[0]):
        m_i, s_i, a_i = stats[i, 0], stats[i, 1], stats[i, 2]
        d = m_i - M
        scale = d.exp()
        S += s_i * scale
        A += scale * (a_i + d * s_i)
        if extra:
            Q += scale * scale * stats[i, 4]
    log_s = S.log()
    lse = M + log_s
    valid = targets != ignore_index
    ZY = stats[:, 3].sum(0)
    logps = torch.where(valid, (ZY - M) - log_s, 0.0)
    entropy = torch.where(valid, log_s - A / S, 0.0)
    extras = None
    if extra:
        extras = (torch.where(valid, Q.log() - 2 * log_s, 0.0),
                  torch.where(valid, stats[:, 5].sum(0) / vocab_size, 0.0),
                  valid & (ZY >= M) & (ZY > stats[:, 6].amax(0)))
    return logps, entropy, lse, extras


def logps_fwd(hidden, weight, bias, targets, *, temperature, softcap, ignore_index, chunk_bytes, extra=False,
              entropy=True, keep=False):
    """hidden: (N, H), weight: (V, H), targets: (N,) -> (logps, entropy, lse, extras), as combine_stats;
    entropy None with `entropy=False`. With `keep=True` a 5th element: the (N, V) fp32 final-logit tile when
    it fitted one chunk, else None (see partial_stats)."""
    out = partial_stats(hidden, weight, bias, targets, temperature=temperature, softcap=softcap,
                        chunk_bytes=chunk_bytes, extra=extra, entropy=entropy, keep=keep)
    stats, tile = out if keep else (out, None)
    logps, ent, lse, extras = combine_stats(stats, targets, ignore_index, weight.shape[0])
    result = (logps, ent if entropy else None, lse, extras)
    return result + (tile,) if keep else result  # tile: a Kept or None


def zero_rows_(dz: torch.Tensor, ignored: torch.Tensor) -> torch.Tensor:
    """Ignored rows of dz (n, V) set to exactly 0 (even if they hold NaN), writing only those rows on the CPU
    (an index, not a pass over the tile); on an accelerator a masked fill, which needs no host sync."""
    if dz.device.type == "cpu":
        idx = ignored.nonzero().squeeze(1)
        if idx.numel():
            dz.index_fill_(0, idx, 0.0)
        return dz
    return dz.masked_fill_(ignored.unsqueeze(1), 0.0)


@autocast_off
def logps_bwd_dz(hidden, weight, bias, targets, lse, entropy, g_logps, g_entropy, dz, *,
                 temperature, softcap, ignore_index, logits_in_dz=False, exp_shift=None):
    """Write ∂L/∂(raw logits) for one chunk into `dz: (n, V)`; see linear_logps_triton.py.

    The logits are formed in `dz` itself when it is fp32 (nothing else of size (n, V); an fp32 tile when dz is
    low precision: `bwd_bytes_per_logit`), and turned into ∂r in place, slab by slab:
        ∂L/∂z = g (onehot − p) − e p (log p + H),   ∂r = ∂z · (1 − t²) / T   (t: the softcap's tanh)
    the per-row factors (g, e, H and 1/T) folded into two row coefficients, so that the entropy gradient costs
    four passes over a slab (log p, p, the coefficient, the product) and log-probs alone three.
    `weight` should be the call's `head_weight` (upcast once per call, not per chunk). With `logits_in_dz`,
    dz already holds the final logits z (the forward's kept tile): no GEMM; with `exp_shift` (n,) as well, it
    holds e = exp(z − exp_shift) instead (log-probs only, no softcap): ∂r = e·(−g e^{shift − lse}/T), one pass.
    """
    n, V = dz.shape
    dev = dz.device
    out = dz if dz.dtype == torch.float32 else torch.empty((n, V), device=dev, dtype=torch.float32)
    lm = LogitMap(bias, temperature, softcap, dev)
    if logits_in_dz:
        if out is not dz:
            out.copy_(dz)
    else:
        mm_into(out, hidden, head_weight(weight), lm.alpha)
    valid = targets != ignore_index
    inv_t = 1.0 / temperature
    g = torch.where(valid, g_logps, 0.0) * inv_t  # (n,), with the 1/T of ∂r = ∂z / T
    own = valid & (targets >= 0) & (targets < V)  # the one-hot term, where this weight owns the target column
    cols = torch.where(own, targets, 0).long().unsqueeze(1)
    gy = torch.where(own, g, 0.0).unsqueeze(1)
    if g_entropy is not None:
        # ∂z·(1/T) = g·onehot − p (g + e (log p + H)) = g·onehot + p·(c0 + c1·log p), c1 = −e/T, c0 = −(g + eH)
        c1 = (-g_entropy * inv_t).unsqueeze(1)
        c0 = (-g - g_entropy * inv_t * entropy).unsqueeze(1)
    else:
        c0 = (-g).unsqueeze(1)
    if exp_shift is not None:
        if g_entropy is not None or softcap is not None or not logits_in_dz:
            raise ValueError("exp_shift: a kept exp(z − m) tile serves a log-probs gradient without softcap only")
        c0 = c0 * (exp_shift - lse).exp().unsqueeze(1)  # −g/T · e^{m − lse}: p = e·e^{m − lse}
        for r in slabs(n, slab_rows(V, n)):
            out[r].mul_(c0[r]).scatter_add_(1, cols[r], gy[r])
        zero_rows_(out, ~valid)
        return dz if out is dz else dz.copy_(out)
    need = (softcap is not None) + (g_entropy is not None)
    k_slab = slab_rows(V, n)
    bufs = scratch(k_slab, V, dev, need)
    factor = bufs.pop() if softcap is not None else None
    p = bufs.pop() if g_entropy is not None else None
    for r in slabs(n, k_slab):
        x = out[r]
        k = x.shape[0]
        f = None if factor is None else factor[:k]
        if logits_in_dz:
            if f is not None:
                softcap_factor_from_logits(x, lm, f)
        else:
            finish_logits_(x, lm, factor_out=f)
        x.sub_(lse[r].unsqueeze(1))  # log p
        if g_entropy is None:
            x.exp_().mul_(c0[r])  # −g p / T
        else:
            if lm.minus_inf:
                # Where p = 0 (log p = −inf: a masked logit) the term must be 0, not 0·(−inf): log p clamped at
                # −200 changes nothing where p > 0.
                x.clamp_(min=-200.0)
            pk = torch.exp(x, out=p[:k])
            torch.addcmul(c0[r], x, c1[r], out=x).mul_(pk)
        x.scatter_add_(1, cols[r], gy[r])
        if f is not None:
            x.mul_(f)
    # Ignored rows contribute exactly nothing, even if their hidden state is NaN.
    zero_rows_(out, ~valid)
    return dz if out is dz else dz.copy_(out)
