"""Chunked PyTorch backend of the exact two-head KL: same math as linear_kl_triton.py, same bound.

Each token chunk forms both heads' fp32 logits; chunks are sized so that every (chunk, V) buffer
alive at once fits `chunk_bytes` (three fp32 tiles in forward and in backward). Nothing (N, V).
"""

from __future__ import annotations

import torch

from .chunked import autocast_off, chunk_rows, final_logits, softcap_factor_

FWD_BYTES_PER_LOGIT = 12  # both heads' shifted logits and P's exponentials
BWD_BYTES_PER_LOGIT = 12  # log p, log q, p (dz excluded)


@autocast_off
def kl_fwd(ha, wa, hb, wb, valid, *, bias_a=None, bias_b=None, temperature, softcap, chunk_bytes):
    """KL(softmax(A)‖softmax(B)) per token -> kl, lse_a, lse_b: (N,) fp32 (kl = 0 where not valid).

    KL = Σ_v P_v (log P_v − log Q_v) = Σ_v e_v (a_v − b_v) / s_a − log s_a + log s_b, with a, b the logits
    shifted by their row maxima, e = exp(a), s_a = Σ e, s_b = Σ exp(b).
    """
    N, V = ha.shape[0], wa.shape[0]
    out = torch.empty((3, N), device=ha.device, dtype=torch.float32).unbind(0)
    step = chunk_rows(N, V, chunk_bytes, FWD_BYTES_PER_LOGIT)
    for start in range(0, N, step):
        rows = slice(start, min(N, start + step))
        b = final_logits(hb[rows], wb, bias_b, temperature, softcap)  # (n, V)
        m_b = b.amax(-1, keepdim=True)
        b -= m_b
        log_s_b = b.exp().sum(-1).log()  # one transient tile
        a = final_logits(ha[rows], wa, bias_a, temperature, softcap)  # (n, V)
        m_a = a.amax(-1, keepdim=True)
        a -= m_a
        e = a.exp()
        s_a = e.sum(-1)
        c = torch.bmm(e.unsqueeze(1), a.sub_(b).unsqueeze(2)).view(-1)  # Σ e (a − b)
        del a, b, e
        log_s_a = s_a.log()
        out[0][rows] = torch.where(valid[rows] != 0, c / s_a - log_s_a + log_s_b, 0.0)
        out[1][rows] = m_a.squeeze(1) + log_s_a
        out[2][rows] = m_b.squeeze(1) + log_s_b
    return out[0], out[1], out[2]


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
        grad.mul_(logq.neg_().add_(logp).sub_(kl.unsqueeze(1)))  # p (log p − log q − KL)
    del logq
    grad.mul_(torch.where(valid != 0, g, 0.0).unsqueeze(1))
    if softcap is not None:
        grad.mul_(softcap_factor_(logp.add_(lse.unsqueeze(1)), temperature, softcap))
    if temperature != 1.0:
        grad.div_(temperature)
    grad.masked_fill_((valid == 0).unsqueeze(1), 0.0)  # masked rows: exactly nothing, even if NaN
    return dz.copy_(grad)
