"""Chunked PyTorch backend of the exact two-head KL: same math as linear_kl_triton.py, same bound.

Each token chunk forms both heads' fp32 logits; chunks are sized so that every (chunk, V) buffer
alive at once fits `chunk_bytes` (three fp32 tiles in forward and in backward). Nothing (N, V).
"""

from __future__ import annotations

import torch

from .chunked import autocast_off, chunk_rows, final_logits, softcap_factor_
from .common import KL_ROWS

FWD_BYTES_PER_LOGIT = 12  # both heads' shifted logits and P's exponentials
BWD_BYTES_PER_LOGIT = 12  # log p, log q, p (dz excluded)


@autocast_off
def kl_partial_stats(ha, wa, hb, wb, *, bias_a=None, bias_b=None, temperature, softcap, chunk_bytes):
    """Statistics (1, 5, N) fp32 over this head's vocabulary (or vocabulary shard), as the Triton kernel's:
    rows m_a = max a, s_a = Σ e^{a−m_a}, m_b, s_b likewise, c = Σ e^{a−m_a} (a − b) (unshifted a − b)."""
    N, V = ha.shape[0], wa.shape[0]
    stats = torch.empty((1, KL_ROWS, N), device=ha.device, dtype=torch.float32)
    step = chunk_rows(N, V, chunk_bytes, FWD_BYTES_PER_LOGIT)
    for start in range(0, N, step):
        rows = slice(start, min(N, start + step))
        b = final_logits(hb[rows], wb, bias_b, temperature, softcap)  # (n, V)
        m_b = b.amax(-1, keepdim=True)
        b -= m_b
        stats[0, 3, rows] = b.exp().sum(-1)  # one transient tile
        a = final_logits(ha[rows], wa, bias_a, temperature, softcap)  # (n, V)
        m_a = a.amax(-1, keepdim=True)
        a -= m_a
        e = a.exp()
        s_a = e.sum(-1)
        # Σ e (a − b) of the unshifted logits = Σ e (a' − b') + (m_a − m_b) s_a with a', b' shifted.
        # Where both heads are −inf (a −inf-masked padded vocabulary) e = 0 and a − b is NaN: that term is 0.
        diff = a.sub_(b).masked_fill_(e == 0, 0.0)
        c = torch.bmm(e.unsqueeze(1), diff.unsqueeze(2)).view(-1) + (m_a - m_b).squeeze(1) * s_a
        del a, b, e
        stats[0, 0, rows], stats[0, 1, rows], stats[0, 2, rows] = m_a.squeeze(1), s_a, m_b.squeeze(1)
        stats[0, 4, rows] = c
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


def kl_fwd(ha, wa, hb, wb, valid, *, bias_a=None, bias_b=None, temperature, softcap, chunk_bytes):
    """KL(softmax(A)‖softmax(B)) per token -> kl, lse_a, lse_b: (N,) fp32 (kl = 0 where not valid)."""
    stats = kl_partial_stats(ha, wa, hb, wb, bias_a=bias_a, bias_b=bias_b, temperature=temperature,
                             softcap=softcap, chunk_bytes=chunk_bytes)
    return kl_combine_stats(stats, valid)


@autocast_off
def kl_bwd_dz(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, lse, lse_ref, kl, g, dz, *,
              reverse, temperature, softcap):
    """Write ∂L/∂(policy raw logits) for one chunk into `dz: (n, V)`; see linear_kl_triton.py.

    Holds three fp32 (n, V) tiles besides `dz`: log p, log q, p.
    """
    logp = final_logits(hidden, weight, bias, temperature, softcap).sub_(lse.unsqueeze(1))
    logq = final_logits(ref_hidden, ref_weight, ref_bias, temperature, softcap).sub_(lse_ref.unsqueeze(1))
    grad = logp.exp()  # p
    if reverse:
        grad.sub_(logq.exp_())  # p − q
    else:
        # p (log p − log q − KL); p = 0 where both heads are −inf, where the log-ratio is NaN: that term is 0.
        grad.mul_(logq.neg_().add_(logp).sub_(kl.unsqueeze(1)).masked_fill_(grad == 0, 0.0))
    del logq
    grad.mul_(torch.where(valid != 0, g, 0.0).unsqueeze(1))
    if softcap is not None:
        grad.mul_(softcap_factor_(logp.add_(lse.unsqueeze(1)), temperature, softcap))
    if temperature != 1.0:
        grad.div_(temperature)
    grad.masked_fill_((valid == 0).unsqueeze(1), 0.0)  # masked rows: exactly nothing, even if NaN
    return dz.copy_(grad)
