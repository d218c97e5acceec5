"""Chunked PyTorch backend of the exact two-head KL: same math as linear_kl_triton.py, same bound.

Each token chunk forms both heads' fp32 logits (within the byte budget), so at most a few
(chunk, V) fp32 temporaries exist at once; nothing (N, V).
"""

from __future__ import annotations

import torch

from .linear_logps_torch import chunk_rows, raw_logits


def _log_softmaxes(h, w, hr, wr, temperature, softcap):
    z, t = raw_logits(h, w, None, temperature, softcap)
    zr, _ = raw_logits(hr, wr, None, temperature, softcap)
    lse, lse_r = torch.logsumexp(z, -1), torch.logsumexp(zr, -1)
    return z.sub_(lse.unsqueeze(1)), zr.sub_(lse_r.unsqueeze(1)), lse, lse_r, t


def kl_fwd(ha, wa, hb, wb, valid, *, temperature, softcap, budget_bytes):
    """KL(softmax(A)‖softmax(B)) per token -> kl, lse_a, lse_b: (N,) fp32 (kl = 0 where not valid)."""
    N, V = ha.shape[0], wa.shape[0]
    out = torch.empty((3, N), device=ha.device, dtype=torch.float32).unbind(0)
    for start in range(0, N, chunk_rows(N, V, budget_bytes)):
        rows = slice(start, min(N, start + chunk_rows(N, V, budget_bytes)))
        loga, logb, lse_a, lse_b, _ = _log_softmaxes(ha[rows], wa, hb[rows], wb, temperature, softcap)
        kl = torch.bmm(loga.exp().unsqueeze(1), loga.sub_(logb).unsqueeze(2)).view(-1)  # Σ P (log P − log Q)
        out[0][rows] = torch.where(valid[rows] != 0, kl, 0.0)
        out[1][rows] = lse_a
        out[2][rows] = lse_b
    return out[0], out[1], out[2]


def kl_bwd_dz(hidden, weight, ref_hidden, ref_weight, valid, lse, lse_ref, kl, g, dz, *,
              reverse, temperature, softcap):
    """Write ∂L/∂(policy raw logits) for one chunk into `dz: (n, V)`; see linear_kl_triton.py."""
    z, t = raw_logits(hidden, weight, None, temperature, softcap)
    zr, _ = raw_logits(ref_hidden, ref_weight, None, temperature, softcap)
    logp = z.sub_(lse.unsqueeze(1))
    logq = zr.sub_(lse_ref.unsqueeze(1))
    p = logp.exp()
    if reverse:
        d = p.sub_(logq.exp_())  # p − q
    else:
        d = logp.sub_(logq).sub_(kl.unsqueeze(1)).mul_(p)  # p (log p − log q − KL)
    d.mul_(torch.where(valid != 0, g, 0.0).unsqueeze(1))
    if temperature != 1.0:
        d /= temperature
    if t is not None:
        d *= 1.0 - t * t
    d.masked_fill_((valid == 0).unsqueeze(1), 0.0)  # masked rows: exactly nothing, even if NaN
    return dz.copy_(d)
