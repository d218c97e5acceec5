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


def logps_fwd(hidden, weight, bias, targets, *, temperature, softcap, ignore_index, budget_bytes):
    """hidden: (N, H), weight: (V, H), targets: (N,) -> logps, entropy, lse: (N,) fp32."""
    N = hidden.shape[0]
    V = weight.shape[0]
    out = torch.empty((3, N), device=hidden.device, dtype=torch.float32)
    step = chunk_rows(N, V, budget_bytes)
    for start in range(0, N, step):
        sl = slice(start, min(N, start + step))
        z, _ = raw_logits(hidden[sl], weight, bias, temperature, softcap)  # (n, V) fp32
        # Shifted by the row max, as the Triton kernel does: a row holding ±inf or NaN gives NaN
        # (inf − inf), never a finite number; entropy = log s − Σ e (z − m) / s has no cancellation.
        m = z.amax(dim=-1, keepdim=True)
        z -= m
        e = z.exp()
        s = e.sum(-1)
        log_s = s.log()
        y = targets[sl]
        valid = y != ignore_index
        zy = z.gather(1, torch.where(valid, y, 0).long().unsqueeze(1)).squeeze(1)
        ez = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)  # Σ_v e (z − m), no (n, V) temporary
        out[0, sl] = torch.where(valid, zy - log_s, 0.0)
        out[1, sl] = torch.where(valid, log_s - ez / s, 0.0)
        out[2, sl] = m.squeeze(1) + log_s
    return out[0], out[1], out[2]


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
        g -= logp.add_(entropy.unsqueeze(1)).mul_(p).mul_(g_entropy.unsqueeze(1))
    del p, logp
    g.scatter_add_(1, torch.where(valid, targets, 0).long().unsqueeze(1), g_logps.unsqueeze(1))
    if temperature != 1.0:
        g /= temperature
    if t is not None:
        g *= 1.0 - t * t
    # Ignored rows contribute exactly nothing, even if their hidden state is NaN.
    g.masked_fill_(~valid.unsqueeze(1), 0.0)
    return dz.copy_(g)
