"""Naive PyTorch references: the spec every fused op is tested and benchmarked against.

Each function here is written the obvious way, with the full `(N, V)` logits materialised.
They are slow and memory-hungry on purpose: nothing clever, so that nothing can be wrong.
Tests call them in float64 (`dtype=torch.float64`) on the *same* input values the fused op
sees (bf16 inputs are upcast exactly), so the only error left is the fused op's own.
"""

from __future__ import annotations

from typing import Optional

import torch


def head_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Materialised head logits `z = softcap(h Wᵀ + b) / temperature`.

    hidden: (…, H), weight: (V, H), bias: (V,) or None  ->  (…, V) in `dtype`.
    `softcap(x) = c·tanh(x / c)` (Gemma 2 final-logit soft-capping), applied before temperature.
    """
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def linear_logps_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """Reference for `fusealign.linear_logps`, with materialised logits.

    hidden: (…, H), weight: (V, H), targets: (…) int  ->  logps (…) [, entropy (…)] in `dtype`.

    logps[i]   = z[i, targets[i]] − logsumexp(z[i])
    entropy[i] = −Σ_v p[i, v] log p[i, v],   p = softmax(z[i])
    Both are exactly 0 where `targets == ignore_index`. Differentiable by plain autograd.
    """
    z = head_logits(hidden, weight, bias, temperature=temperature, softcap=softcap, dtype=dtype)
    logp_all = torch.log_softmax(z, dim=-1)  # (…, V)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logps = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    # torch.where (not multiplication) so that an ignored row holding NaN still gives exactly 0.
    logps = torch.where(valid, logps, torch.zeros_like(logps))
    if not return_entropy:
        return logps
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logps, entropy


def linear_kl_reference(
    hidden, weight, ref_hidden, ref_weight, *, mask=None, temperature=1.0, direction="forward", softcap=None,
    dtype=torch.float32,
):
    """Reference for `fusealign.linear_kl`: KL between the two heads' softmaxes, materialised.

    forward: Σ_v p_v (log p_v − log q_v) = KL(π‖π_ref);  reverse: Σ_v q_v (log q_v − log p_v) = KL(π_ref‖π).
    """
    logp = torch.log_softmax(head_logits(hidden, weight, temperature=temperature, softcap=softcap, dtype=dtype), -1)
    logq = torch.log_softmax(head_logits(ref_hidden, ref_weight, temperature=temperature, softcap=softcap,
                                         dtype=dtype), -1)
    if direction == "forward":
        kl = (logp.exp() * (logp - logq)).sum(-1)
    else:
        kl = (logq.exp() * (logq - logp)).sum(-1)
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl
