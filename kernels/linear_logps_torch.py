"""Chunked pure-PyTorch backend of the fused linear log-probs: same math, same memory bound.

Same equations as linear_logps_triton.py. Tokens are processed in chunks sized so that every
(chunk, V) buffer alive at once fits the byte budget `chunk_bytes` (default 256 MiB): each function
below states how many bytes per logit it holds (`*_BYTES_PER_LOGIT`), and `chunk_rows` divides the
budget by that. Peak extra memory is therefore ≤ chunk_bytes plus O(N) statistics — never (N, V).
Runs anywhere PyTorch runs; used on the CPU and as the fallback.

Logits are always formed in fp32 (chunked.py: `mm_f32`, `final_logits`).
"""

from __future__ import annotations

import torch

from .chunked import autocast_off, chunk_rows, final_logits, softcap_factor_
from .common import EXTRA_STAT_ROWS, stat_rows

# (chunk, V) buffers alive at once, in bytes per logit (fp32 tiles are 4, bool masks 1):
FWD_BYTES_PER_LOGIT = 8  # partial_stats: logits and their exponentials
# With the extra statistics, before `e` exists: logits, the mask of columns before the target and the masked copy.
FWD_EXTRA_BYTES_PER_LOGIT = 9
BWD_BYTES_PER_LOGIT = 12  # logps_bwd_dz: log p, p and the entropy coefficient (dz excluded)
# −inf logits (masked vocabulary) are clamped to the lowest finite float before they multiply a zero
# probability, so 0·log 0 = 0 without a (chunk, V) bool mask; NaN passes through clamp unchanged.
_LOWEST = torch.finfo(torch.float32).min


@autocast_off
def partial_stats(hidden, weight, bias, targets, *, temperature, softcap, chunk_bytes, extra=False):
    """Statistics (1, ROWS, N) fp32 — rows m, s, a, zy, and with `extra` q, zs, mb, as in
    linear_logps_triton.py — over this weight's vocabulary; zy = 0 for targets outside [0, V) (ignored, or
    owned by another vocabulary shard); mb compares column indices with the target whatever its range."""
    N = hidden.shape[0]
    V = weight.shape[0]
    stats = torch.empty((1, stat_rows(extra), N), device=hidden.device, dtype=torch.float32)
    step = chunk_rows(N, V, chunk_bytes, FWD_EXTRA_BYTES_PER_LOGIT if extra else FWD_BYTES_PER_LOGIT)
    cols = torch.arange(V, device=hidden.device) if extra else None
    for start in range(0, N, step):
        sl = slice(start, min(N, start + step))
        y = targets[sl]
        z = final_logits(hidden[sl], weight, bias, temperature, softcap)  # (n, V) fp32
        # Shifted by the row max, as the Triton kernel does: a row holding ±inf or NaN gives NaN
        # (inf − inf), never a finite number.
        m = z.amax(dim=-1, keepdim=True)
        zy = z.gather(1, y.clamp(0, V - 1).long().unsqueeze(1)).squeeze(1)
        if extra:  # from the unshifted logits, so that z_y and max_{v<y} z_v compare exactly
            stats[0, 5, sl] = z.sum(-1)
            stats[0, 6, sl] = torch.where(cols < y.unsqueeze(1), z, -torch.inf).amax(-1)
        z -= m
        e = z.exp()
        stats[0, 0, sl] = m.squeeze(1)
        stats[0, 1, sl] = e.sum(-1)
        if extra:
            stats[0, 4, sl] = torch.bmm(e.unsqueeze(1), e.unsqueeze(2)).view(-1)  # Σ e², no (n, V) temp
        z.clamp_(min=_LOWEST)  # 0·log 0 = 0 for logits at −inf (NaN rows keep NaN)
        stats[0, 2, sl] = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)  # Σ e (z − m), no (n, V) temp
        stats[0, 3, sl] = torch.where((y >= 0) & (y < V), zy, 0.0)
        del z, e
    return stats


def combine_stats(stats, targets, ignore_index, vocab_size=None):
    """stats: (P, ROWS, N) from any mix of vocabulary splits/shards -> (logps, entropy, lse, extras).

    M = max m_i, S = Σ s_i e^{m_i−M}, A = Σ e^{m_i−M}(a_i + (m_i − M) s_i); lse = M + log S,
    entropy = log S − A/S. With the extra rows (ROWS = 7; `vocab_size` = the whole head's V), extras =
    (log_sum_sq_probs = log Q − 2 log S with Q = Σ q_i e^{2(m_i−M)}, mean_logits = Σ zs_i / V,
    is_top1 = z_y ≥ M and z_y > max_i mb_i), else None. Merged in a fixed order: deterministic whatever P is.
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
    logps = torch.where(valid, ZY - lse, 0.0)
    entropy = torch.where(valid, log_s - A / S, 0.0)
    extras = None
    if extra:
        extras = (torch.where(valid, Q.log() - 2 * log_s, 0.0),
                  torch.where(valid, stats[:, 5].sum(0) / vocab_size, 0.0),
                  valid & (ZY >= M) & (ZY > stats[:, 6].amax(0)))
    return logps, entropy, lse, extras


def logps_fwd(hidden, weight, bias, targets, *, temperature, softcap, ignore_index, chunk_bytes, extra=False):
    """hidden: (N, H), weight: (V, H), targets: (N,) -> (logps, entropy, lse, extras), as combine_stats."""
    stats = partial_stats(hidden, weight, bias, targets, temperature=temperature, softcap=softcap,
                          chunk_bytes=chunk_bytes, extra=extra)
    return combine_stats(stats, targets, ignore_index, weight.shape[0])


@autocast_off
def logps_bwd_dz(hidden, weight, bias, targets, lse, entropy, g_logps, g_entropy, dz, *,
                 temperature, softcap, ignore_index):
    """Write ∂L/∂(raw logits) for one chunk into `dz: (n, V)`; see linear_logps_triton.py.

    Holds BWD_BYTES_PER_LOGIT bytes per logit besides `dz`: log p, p and (with an entropy gradient)
    the coefficient g + e (log p + H), all fp32.
    """
    logp = final_logits(hidden, weight, bias, temperature, softcap).sub_(lse.unsqueeze(1))  # (n, V)
    valid = targets != ignore_index
    g = torch.where(valid, g_logps, 0.0).unsqueeze(1)  # (n, 1)
    grad = logp.exp()  # p; becomes ∂L/∂z in place
    if g_entropy is None:
        grad.mul_(-g)
    else:
        # ∂L/∂z = g (onehot − p) − e p (log p + H) = g·onehot − p (g + e (log p + H)). Where p = 0 (log p
        # below −104, or −inf for a masked logit) the term must be 0, not 0·(−inf): the coefficient
        # uses log p clamped at −200, which changes nothing where p > 0.
        coef = logp.clamp(min=-200.0).add_(entropy.unsqueeze(1)).mul_(g_entropy.unsqueeze(1)).add_(g)
        grad.mul_(coef).neg_()
        del coef
    # The one-hot term, where the target is a column of this weight (a vocabulary shard may not own it).
    own = valid & (targets >= 0) & (targets < weight.shape[0])
    grad.scatter_add_(1, torch.where(own, targets, 0).long().unsqueeze(1), torch.where(own.unsqueeze(1), g, 0.0))
    if softcap is not None:
        grad.mul_(softcap_factor_(logp.add_(lse.unsqueeze(1)), temperature, softcap))
    if temperature != 1.0:
        grad.div_(temperature)
    # Ignored rows contribute exactly nothing, even if their hidden state is NaN.
    grad.masked_fill_(~valid.unsqueeze(1), 0.0)
    return dz.copy_(grad)
