"""Chunked pure-PyTorch backend of the fused linear log-probs: same math, same memory bound.

Same equations as linear_logps_triton.py. Tokens are processed in chunks whose fp32 logits fit a
byte budget (default 256 MiB), so peak extra memory is a few chunk-sized temporaries plus O(N)
statistics — never (N, V). Runs anywhere PyTorch runs; used on the CPU and as the fallback.

Logits are always formed in fp32: on CUDA via `torch.mm(..., out_dtype=torch.float32)`
(bf16/fp16 tensor cores, fp32 output), elsewhere by upcasting the operands.
"""

from __future__ import annotations

import torch


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: (M, K), b: (K, N), same dtype  ->  (M, N) fp32, accumulated in fp32."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def chunk_rows(N: int, V: int, budget_bytes: int) -> int:
    """Tokens per chunk so that a (rows, V) fp32 tile stays within `budget_bytes`."""
    return max(1, min(N, budget_bytes // (4 * V)))


def raw_logits(hidden_c, weight, bias, temperature, softcap):
    """hidden_c: (n, H) -> (z, t): final logits (n, V) fp32, and tanh(r/softcap) or None."""
    z = mm_f32(hidden_c, weight.T)
    if bias is not None:
        z += bias.float()
    t = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = t * softcap
    if temperature != 1.0:
        z /= temperature
    return z, t


def partial_stats(hidden, weight, bias, targets, *, temperature, softcap, budget_bytes):
    """Statistics (1, 4, N) fp32 — rows m, s, a, zy as in linear_logps_triton.py — over this weight's
    vocabulary; zy = 0 for targets outside [0, V) (ignored, or owned by another vocabulary shard)."""
    N = hidden.shape[0]
    V = weight.shape[0]
    stats = torch.empty((1, 4, N), device=hidden.device, dtype=torch.float32)
    step = chunk_rows(N, V, budget_bytes)
    for start in range(0, N, step):
        sl = slice(start, min(N, start + step))
        z, _ = raw_logits(hidden[sl], weight, bias, temperature, softcap)  # (n, V) fp32
        # Shifted by the row max, as the Triton kernel does: a row holding ±inf or NaN gives NaN
        # (inf − inf), never a finite number.
        m = z.amax(dim=-1, keepdim=True)
        zy = z.gather(1, targets[sl].clamp(0, V - 1).long().unsqueeze(1)).squeeze(1)
        z -= m
        e = z.exp()
        stats[0, 0, sl] = m.squeeze(1)
        stats[0, 1, sl] = e.sum(-1)
        z.masked_fill_(e == 0, 0.0)  # 0·log 0 = 0 for logits at −inf (NaN rows keep e = NaN)
        stats[0, 2, sl] = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)  # Σ e (z − m), no (n, V) temp
        stats[0, 3, sl] = torch.where((targets[sl] >= 0) & (targets[sl] < V), zy, 0.0)
    return stats


def combine_stats(stats, targets, ignore_index):
    """stats: (P, 4, N) from any mix of vocabulary splits/shards -> logps, entropy, lse: (N,) fp32.

    M = max m_i, S = Σ s_i e^{m_i−M}, A = Σ e^{m_i−M}(a_i + (m_i − M) s_i); lse = M + log S,
    entropy = log S − A/S. Merged in a fixed order: deterministic whatever P is.
    """
    M = stats[:, 0].amax(0)
    S = torch.zeros_like(M)
    A = torch.zeros_like(M)
    for i in range(stats.shape[0]):
        m_i, s_i, a_i, _ = stats[i]
        d = m_i - M
        scale = d.exp()
        S += s_i * scale
        A += scale * (a_i + d * s_i)
    log_s = S.log()
    lse = M + log_s
    valid = targets != ignore_index
    logps = torch.where(valid, stats[:, 3].sum(0) - lse, 0.0)
    entropy = torch.where(valid, log_s - A / S, 0.0)
    return logps, entropy, lse


def logps_fwd(hidden, weight, bias, targets, *, temperature, softcap, ignore_index, budget_bytes):
    """hidden: (N, H), weight: (V, H), targets: (N,) -> logps, entropy, lse: (N,) fp32."""
    stats = partial_stats(hidden, weight, bias, targets, temperature=temperature, softcap=softcap,
                          budget_bytes=budget_bytes)
    return combine_stats(stats, targets, ignore_index)


def logps_bwd_dz(hidden, weight, bias, targets, lse, entropy, g_logps, g_entropy, dz, *,
                 temperature, softcap, ignore_index):
    """Write ∂L/∂(raw logits) for one chunk into `dz: (n, V)`; see linear_logps_triton.py.

    At most three (n, V) fp32 temporaries live at once (log p, p, the gradient), four with softcap.
    """
    z, t = raw_logits(hidden, weight, bias, temperature, softcap)
    logp = z.sub_(lse.unsqueeze(1))  # (n, V), in place
    p = logp.exp()
    valid = targets != ignore_index
    g_logps = torch.where(valid, g_logps, 0.0)
    # ∂L/∂z = g_logp (onehot − p) − g_ent p (log p + entropy)
    g = p * (-g_logps.unsqueeze(1))
    if g_entropy is not None:
        g -= logp.add_(entropy.unsqueeze(1)).mul_(p).masked_fill_(p == 0, 0.0).mul_(g_entropy.unsqueeze(1))
    del p, logp
    g.scatter_add_(1, torch.where(valid, targets, 0).long().unsqueeze(1), g_logps.unsqueeze(1))
    if temperature != 1.0:
        g /= temperature
    if t is not None:
        g *= 1.0 - t * t
    # Ignored rows contribute exactly nothing, even if their hidden state is NaN.
    g.masked_fill_(~valid.unsqueeze(1), 0.0)
    return dz.copy_(g)
