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
    outputs: Optional[tuple] = None,
    dtype: torch.dtype = torch.float32,
):
    """Reference for `fusealign.linear_logps`, with materialised logits.

    hidden: (…, H), weight: (V, H), targets: (…) int  ->  logps (…) [, entropy (…)] in `dtype`, or with
    `outputs=` (names as `linear_logps`) a tuple of those outputs in that order:

    logps[i]            = z[i, targets[i]] − logsumexp(z[i])
    entropy[i]          = −Σ_v p[i, v] log p[i, v],   p = softmax(z[i])
    log_sum_sq_probs[i] = log Σ_v p[i, v]²
    mean_logits[i]      = (1/V) Σ_v z[i, v]
    is_top1[i]          = argmax_v z[i, v] == targets[i]   (torch.argmax: the first maximum), bool
    All are exactly 0 (False) where `targets == ignore_index`. Differentiable by plain autograd (TRL's
    trainers, and `linear_logps`, treat the last three as constants).
    """
    z = head_logits(hidden, weight, bias, temperature=temperature, softcap=softcap, dtype=dtype)
    logp_all = torch.log_softmax(z, dim=-1)  # (…, V)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()

    def masked(x):  # torch.where (not multiplication): an ignored row holding NaN still gives exactly 0
        return torch.where(valid, x, torch.zeros_like(x))

    logps = masked(logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1))
    if outputs is None and not return_entropy:
        return logps
    p = logp_all.exp()
    entropy = masked(-torch.where(p > 0, p * logp_all, 0.0).sum(-1))  # 0·log 0 = 0 (logits at −inf)
    if outputs is None:
        return logps, entropy
    everything = dict(logps=logps, entropy=entropy,
                      log_sum_sq_probs=masked(torch.logsumexp(2 * logp_all, -1)),
                      mean_logits=masked(z.mean(-1)),
                      is_top1=valid & (z.argmax(-1) == safe_targets))
    return tuple(everything[name] for name in outputs)


def linear_kl_reference(
    hidden, weight, ref_hidden, ref_weight, *, mask=None, temperature=1.0, direction="forward", softcap=None,
    bias=None, ref_bias=None, dtype=torch.float32,
):
    """Reference for `fusealign.linear_kl`: KL between the two heads' softmaxes, materialised.

    forward: Σ_v p_v (log p_v − log q_v) = KL(π‖π_ref);  reverse: Σ_v q_v (log q_v − log p_v) = KL(π_ref‖π).
    """
    logp = torch.log_softmax(head_logits(hidden, weight, bias, temperature=temperature, softcap=softcap,
                                         dtype=dtype), -1)
    logq = torch.log_softmax(head_logits(ref_hidden, ref_weight, ref_bias, temperature=temperature, softcap=softcap,
                                         dtype=dtype), -1)
    if direction == "forward":
        kl = (logp.exp() * (logp - logq)).sum(-1)
    else:
        kl = (logq.exp() * (logq - logp)).sum(-1)
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl


def dpo_loss_reference(pc, pr, rc, rr, *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, gamma=0.0):
    """Reference DPO family on (B,) sequence log-probs, written pair by pair from each paper's own form —
    independently of the production table in `fusealign.losses.preference` (no logsigmoid, no shared Δ):

      implicit rewards  r_w = β (log π(y_w) − log π_ref(y_w)),  r_l = β (log π(y_l) − log π_ref(y_l))
      sigmoid  Rafailov et al. 2023, Eq. 7, with cDPO label smoothing ε (Mitchell 2023):
               −(1−ε) log σ(r_w − r_l) − ε log σ(r_l − r_w),      −log σ(x) = log(1 + e^{−x})
      robust   Chowdhury et al. 2024, Eq. 9: ((1−ε) L(y_w ≻ y_l) − ε L(y_l ≻ y_w)) / (1 − 2ε),  L = −log σ(·)
      hinge    SLiC, Zhao et al. 2023: max(0, 1 − (r_w − r_l))
      ipo      Azar et al. 2023, Eq. 17: (h − 1/(2τ))²,  h = log-ratio difference, τ = β
      simpo    Meng et al. 2024, Eq. 6 (inputs already length-normalised): −log σ(β (π̄_w − π̄_l) − γ),
               label smoothing as sigmoid.
    Returns (B,) losses in the inputs' dtype; differentiable in pc and pr.
    """
    eps = label_smoothing

    def neg_log_sigmoid(x):  # log(1 + e^{−x}), stable for either sign of x
        return torch.log1p(torch.exp(-torch.abs(x))) + torch.clamp(-x, min=0)

    out = []
    for i in range(pc.shape[0]):
        if loss_type == "simpo":
            x = beta * (pc[i] - pr[i]) - gamma
            out.append((1 - eps) * neg_log_sigmoid(x) + eps * neg_log_sigmoid(-x))
            continue
        log_ratio_w = pc[i] - rc[i].detach()
        log_ratio_l = pr[i] - rr[i].detach()
        r_w, r_l = beta * log_ratio_w, beta * log_ratio_l
        if loss_type == "sigmoid":
            out.append((1 - eps) * neg_log_sigmoid(r_w - r_l) + eps * neg_log_sigmoid(r_l - r_w))
        elif loss_type == "robust":
            out.append(((1 - eps) * neg_log_sigmoid(r_w - r_l) - eps * neg_log_sigmoid(r_l - r_w)) / (1 - 2 * eps))
        elif loss_type == "hinge":
            out.append(torch.clamp(1 - (r_w - r_l), min=0))
        elif loss_type == "ipo":
            h = log_ratio_w - log_ratio_l
            out.append((h - 1 / (2 * beta)) ** 2)
        else:
            raise ValueError(loss_type)
    return torch.stack(out)


def linear_dpo_loss_reference(hidden, weight, targets, *, ref_chosen_logps=None, ref_rejected_logps=None,
                              ref_hidden=None, ref_weight=None, beta=0.1, loss_type="sigmoid",
                              label_smoothing=0.0, average_logps=False, nll_coef=0.0, ignore_index=-100,
                              gamma=0.0, dtype=torch.float64):
    """Reference fused DPO on the padded layout hidden (2B, T, H): materialised logits, plain sums."""
    def seq_logps(h, w):
        lp = linear_logps_reference(h, w, targets, ignore_index=ignore_index, dtype=dtype)  # (2B, T)
        n = (targets != ignore_index).sum(-1)
        s = lp.sum(-1)
        return (s / n if average_logps else s), lp

    pol, tok = seq_logps(hidden, weight)
    B = hidden.shape[0] // 2
    if ref_hidden is not None:
        ref, _ = seq_logps(ref_hidden, ref_weight)
        ref_chosen_logps, ref_rejected_logps = ref[:B].detach(), ref[B:].detach()
    losses = dpo_loss_reference(pol[:B], pol[B:], ref_chosen_logps, ref_rejected_logps, beta=beta,
                                loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma)
    nll = -tok[:B].sum() / (targets[:B] != ignore_index).sum()
    return losses.mean() + nll_coef * nll


def sequence_rewards_reference(hidden, value_weight, mask, value_bias=None):
    """Loop over rows: the reward of row b is value_weight · hidden[b, last index where mask is 1]."""
    out = []
    for b in range(hidden.shape[0]):
        last = max(i for i in range(hidden.shape[1]) if mask[b, i])
        r = hidden[b, last] @ value_weight.reshape(-1)
        out.append(r + (value_bias.reshape(()) if value_bias is not None else 0))
    return torch.stack(out)


def ppo_policy_loss_reference(logps, entropy, old_logps, advantages, mask, *, ref_logps=None, clip_eps=0.2,
                              clip_eps_high=None, dual_clip=None, kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0,
                              loss_agg="token-mean"):
    """Reference PPO/GRPO clipped loss on per-token log-probs (B, T), written token by token."""
    dtype = logps.dtype
    mask = mask.to(dtype)
    if advantages.dim() == 1 and logps.dim() == 2:
        advantages = advantages[:, None].expand_as(logps)
    A = advantages.to(dtype)
    ratio = torch.exp((logps - old_logps.to(dtype)) * mask)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    loss = torch.max(-A * ratio, -A * torch.clamp(ratio, 1 - clip_eps, 1 + high))
    if dual_clip is not None:
        loss = torch.where(A < 0, torch.min(loss, -A * dual_clip), loss)
    if ref_logps is not None and kl_coef:
        d = logps - ref_logps.to(dtype)
        kl = {"k1": d, "k2": 0.5 * d ** 2, "k3": torch.exp(-d) + d - 1}[kl_estimator]
        loss = loss + kl_coef * kl
    if entropy_coef:
        loss = loss - entropy_coef * entropy
    if loss_agg == "token-mean":
        return (loss * mask).sum() / mask.sum()
    if loss_agg == "seq-mean-token-sum":
        return (loss * mask).sum(-1).mean()
    return ((loss * mask).sum(-1) / mask.sum(-1)).mean()


def ppo_loss_reference(hidden, weight, targets, old_logps, advantages, *, temperature=1.0, ignore_index=-100,
                       dtype=torch.float64, **loss_options):
    """Reference fused PPO/GRPO loss on (B, T) tokens: materialised logits, then the token-by-token loss."""
    logps, entropy = linear_logps_reference(hidden, weight, targets, temperature=temperature,
                                            ignore_index=ignore_index, return_entropy=True, dtype=dtype)
    return ppo_policy_loss_reference(logps, entropy, old_logps, advantages, targets != ignore_index, **loss_options)
