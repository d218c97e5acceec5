"""Policy-gradient losses on the fused core: sampled-token KL estimators, PPO/GRPO clip loss, value loss.

`linear_ppo_loss` = the fused log-prob/entropy core (`linear_logps`) + `ppo_policy_loss`, its
tensor-level twin (an elementwise epilogue over tokens), so no (N, V) tensor exists and gradients
reach `hidden`/`weight` only through linear_logps's backward.
Metrics are detached 0-d tensors with TRL's names (no host sync).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fusealign.kernels import DEFAULT_CHUNK_BYTES, linear_logps
from fusealign.kernels.checks import check_positive

from .grpo import check_vllm_is_options, vllm_importance_ratio
from .options import option_field, resolve_options


# --- sampled-token KL estimators, Schulman 2020 ("Approximating KL Divergence") ---------------------
# With r = π_ref(y)/π(y) for y ~ π, and log r = ref − logp:
def _k1(logps, ref_logps):
    """k1 = −log r = logp − ref: unbiased, high variance, can be negative."""
    return logps - ref_logps


def _k2(logps, ref_logps):
    """k2 = ½ (log r)²: biased, low variance, ≥ 0."""
    return 0.5 * (logps - ref_logps) ** 2


def _k3(logps, ref_logps):
    """k3 = (r − 1) − log r: unbiased, low variance, ≥ 0 (GRPO's KL term). expm1 keeps it exact near r = 1."""
    log_r = ref_logps - logps
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS = {"k1": _k1, "k2": _k2, "k3": _k3}
LOSS_AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Elementwise KL(π‖π_ref) estimate from the sampled tokens' log-probs (any equal shapes)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(KL_ESTIMATORS)}, got {estimator!r}")
    if logps.shape != ref_logps.shape:
        raise ValueError(f"ref_logps shape {tuple(ref_logps.shape)} differs from logps {tuple(logps.shape)}")
    return KL_ESTIMATORS[estimator](logps, ref_logps)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask (0 when the mask is empty)."""
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp_min(1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Reduce per-token losses (B, T) (or (N,) for token-mean) over `mask` to a scalar.

    token-mean: Σ l / Σ m over all tokens (DAPO);  seq-mean-token-sum: mean over sequences of Σ_t l
    (Dr. GRPO's length-unbiased form);  seq-mean-token-mean: mean over sequences of the per-sequence
    token mean (original GRPO). Sequences with no valid token are left out of the sequence mean.
    """
    if loss_agg == "token-mean":
        return masked_mean(per_token, mask)
    if per_token.dim() != 2:
        raise ValueError(f"loss_agg={loss_agg!r} needs (B, T) inputs, got shape {tuple(per_token.shape)}")
    seq_sum = torch.where(mask, per_token, 0.0).sum(-1)
    counts = mask.sum(-1)
    has_tokens = counts > 0
    per_seq = seq_sum if loss_agg == "seq-mean-token-sum" else seq_sum / counts.clamp_min(1)
    return torch.where(has_tokens, per_seq, 0.0).sum() / has_tokens.sum().clamp_min(1)


@dataclass(frozen=True)
class PPOOptions:
    """Options of the clipped policy loss (PPO / GRPO surrogate), validated once here."""

    clip_eps: float = option_field(0.2, "policy ratio clip ε")
    clip_eps_high: Optional[float] = option_field(None, "upper clip ε_high (clip-higher, DAPO; default: ε)")
    dual_clip: Optional[float] = option_field(None, "dual-clip constant c > 1 for negative advantages (Ye et al. 2020)")
    kl_coef: float = option_field(0.0, "weight of the sampled-token KL term to the reference in the loss")
    kl_estimator: str = option_field("k3", "k1, k2 or k3 (Schulman 2020) for the KL term")
    entropy_coef: float = option_field(0.0, "entropy bonus")
    loss_agg: str = option_field("token-mean", "token-mean, seq-mean-token-sum or seq-mean-token-mean")
    # The rollout-mismatch correction, as GRPOOptions' (TRL 1.16's names, defaults and definitions), for the PPO loss.
    vllm_importance_sampling_correction: bool = option_field(
        True, "when the sampler's own log-probs are given (--rollout vllm), multiply the policy term by the "
              "sampler-mismatch ratio π_old/π_sampler (TRL's; PPO and GRPO alike)")
    vllm_importance_sampling_mode: str = option_field(
        "sequence_mask", "token_truncate, token_mask, sequence_truncate or sequence_mask: the ratio per token or "
                         "per sequence (the product over its tokens), clamped to [C_min, C_max] or zeroed outside")
    vllm_importance_sampling_clip_min: Optional[float] = option_field(
        None, "C_min of the sampler-mismatch ratio (truncate: clamp from below; mask: zero below)")
    vllm_importance_sampling_clip_max: Optional[float] = option_field(
        3.0, "C_max of the sampler-mismatch ratio (truncate: clamp from above; mask: zero above)")

    def __post_init__(self):
        check_positive("clip_eps", self.clip_eps)
        check_positive("clip_eps_high", self.clip_eps if self.clip_eps_high is None else self.clip_eps_high)
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 (it bounds −A·r for negative advantages), got {self.dual_clip}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError(f"kl_coef and entropy_coef must be >= 0, got {self.kl_coef} and {self.entropy_coef}")
        check_vllm_is_options(self)


def _broadcast_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if advantages.shape == like.shape:
        return advantages
    if like.dim() == 2 and tuple(advantages.shape) == (like.shape[0],):
        return advantages.unsqueeze(1).expand_as(like)  # one advantage per sequence (GRPO / RLOO)
    raise ValueError(f"advantages shape {tuple(advantages.shape)} must equal the token shape {tuple(like.shape)} "
                     f"or be (B,) per sequence")


def ppo_policy_loss(
    logps: torch.Tensor,
    entropy: Optional[torch.Tensor],
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: Optional[torch.Tensor] = None,
    sampling_logps: Optional[torch.Tensor] = None,
    options: Optional[PPOOptions] = None,
    **loss_options,
):
    """PPO / GRPO clipped policy loss on per-token log-probs: the tensor-level twin of `linear_ppo_loss`.

    logps, entropy (or None when entropy_coef = 0), old_logps, mask (bool), ref_logps, sampling_logps: (B, T) or
    (N,); advantages: like logps, or (B,) per sequence, broadcast over T. Per token, with the ratio
    r = exp(logp − old_logp) and advantage A (Schulman et al. 2017, Eq. 7):
        pg = max(−A·r, −A·clip(r, 1 − ε, 1 + ε_high))
        dual clip c > 1 (Ye et al. 2020), for A < 0 only: pg = min(pg, −A·c)
        with the sampler's own log-probs ℓ_s (`sampling_logps`, e.g. vLLM's) and the correction on:
            pg ← pg · r^IS,  log r^IS = m · (ℓ_old − ℓ_s) per token (token_*) or summed per sequence (sequence_*,
            (B, T) inputs only); *_truncate clamps r^IS to [C_min, C_max], *_mask zeroes it outside (TRL 1.16's
            GRPOTrainer correction, `fa.grpo_loss`'s, here for PPO)
        loss_t = pg + kl_coef · KL_est(logp, ref) − entropy_coef · entropy
    aggregated by `loss_agg` over the tokens where `mask` holds. The options (ε = `clip_eps`, ε_high =
    `clip_eps_high`, c = `dual_clip`, `kl_coef`, `kl_estimator`, `entropy_coef`, `loss_agg`, the four
    `vllm_importance_sampling_*`) are one `PPOOptions` (`options=`) or its fields as keywords.
    Returns (loss: 0-d, metrics: dict of detached 0-d tensors, TRL's names; with the correction also
    sampling/{sampling_logp_difference/{mean, max}, importance_sampling_ratio/{min, mean, max}}).
    """
    o = resolve_options(PPOOptions, options, loss_options, caller="ppo_policy_loss")
    clip_eps, dual_clip, kl_coef, entropy_coef = o.clip_eps, o.dual_clip, o.kl_coef, o.entropy_coef
    if kl_coef > 0 and ref_logps is None:
        raise ValueError("kl_coef > 0 needs ref_logps (the reference policy's log-probs of the same tokens)")
    if entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs the per-token entropy")
    for name, t in (("entropy", entropy), ("old_logps", old_logps), ("mask", mask), ("ref_logps", ref_logps),
                    ("sampling_logps", sampling_logps)):
        if t is not None and t.shape != logps.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal logps shape {tuple(logps.shape)}")
    correct = sampling_logps is not None and o.vllm_importance_sampling_correction
    if correct and o.vllm_importance_sampling_mode.startswith("sequence") and logps.dim() != 2:
        raise ValueError(f"vllm_importance_sampling_mode={o.vllm_importance_sampling_mode!r} takes one ratio per "
                         f"sequence: pass (B, T) tensors (got shape {tuple(logps.shape)}), or a token_* mode")
    A = _broadcast_advantages(advantages, logps).to(logps.dtype)
    mask = mask.bool()
    is_metrics = {}
    if correct:  # a constant per token (or per sequence): π_old / π_sampler
        is_ratio, is_metrics = vllm_importance_ratio(old_logps.detach().to(logps.dtype),
                                                     sampling_logps.detach().to(logps.dtype), mask, o)
    eps_high = clip_eps if o.clip_eps_high is None else o.clip_eps_high
    log_ratio = torch.where(mask, logps - old_logps.detach().to(logps.dtype), 0.0)  # 0 off the mask: no inf · 0 there
    ratio = log_ratio.exp()
    pg_unclipped = -A * ratio
    pg_clipped = -A * ratio.clamp(1.0 - clip_eps, 1.0 + eps_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    if dual_clip is not None:
        pg = torch.where(A < 0, torch.minimum(pg, -A * dual_clip), pg)
    if correct:
        pg = pg * is_ratio
    per_token = pg
    kl = None
    if ref_logps is not None:
        kl = kl_estimate(logps, ref_logps.detach().to(logps.dtype), o.kl_estimator)
        if kl_coef:
            per_token = per_token + kl_coef * kl
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy
    loss = aggregate(per_token, mask, o.loss_agg)

    with torch.no_grad():
        metrics = {
            "policy/clipfrac": masked_mean((pg_clipped > pg_unclipped).float(), mask),
            "policy/approxkl": masked_mean(0.5 * log_ratio ** 2, mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
            "loss/policy": aggregate(pg, mask, o.loss_agg),
        }
        if entropy is not None:
            metrics["policy/entropy"] = masked_mean(entropy, mask)
        if kl is not None:
            metrics["objective/kl"] = masked_mean(kl, mask)
        metrics.update(is_metrics)
    return loss, metrics


def linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    ref_logps: Optional[torch.Tensor] = None,
    sampling_logps: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    options: Optional[PPOOptions] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    softcap: Optional[float] = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    group=None,
    **loss_options,
):
    """Fused PPO / GRPO clipped policy loss from hidden states: `linear_logps` + `ppo_policy_loss`.

    hidden: (B, T, H) or (N, H); targets, old_logps (and ref_logps, sampling_logps): (B, T) or (N,);
    advantages: like targets, or (B,) per sequence (GRPO/RLOO), broadcast over T.
    The loss and metrics are `ppo_policy_loss`'s (see there for the formula; options: one `PPOOptions` or its
    fields as keywords) over the tokens whose target is not ignore_index, with log-probs and entropy from the
    fused head — no (N, V) logits; the head's options are `fa.linear_logps`'s.
    Vocabulary-parallel heads as `linear_logps`: a Shard(0) DTensor `weight`, or a local shard with
    `vocab_start=, vocab_size=, group=`.
    Returns (loss: 0-d, metrics: dict of detached 0-d tensors).
    """
    o = resolve_options(PPOOptions, options, loss_options, caller="linear_ppo_loss")
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps), ("sampling_logps", sampling_logps)):
        if t is not None and t.shape != targets.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal targets shape {tuple(targets.shape)}")
    advantages = _broadcast_advantages(advantages, targets)
    if o.kl_coef > 0 and ref_logps is None:
        raise ValueError("kl_coef > 0 needs ref_logps (the reference policy's log-probs of the same tokens)")
    logps, entropy = linear_logps(hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                                  ignore_index=ignore_index, return_entropy=True, backend=backend,
                                  chunk_bytes=chunk_bytes, vocab_start=vocab_start, vocab_size=vocab_size,
                                  group=group)
    return ppo_policy_loss(logps, entropy, old_logps, advantages, targets != ignore_index, ref_logps=ref_logps,
                           sampling_logps=sampling_logps, options=o)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    clip_eps: Optional[float] = 0.2,
    mask: Optional[torch.Tensor] = None,
):
    """Clipped value loss (PPO2 / TRL): ½ · mean(max((v − R)², (v_clip − R)²)), v_clip = old + clip(v − old, ±ε).

    values, old_values, returns, mask: equal shapes; `clip_eps=None` disables clipping.
    Returns (loss: 0-d, metrics {"val/clipfrac", "loss/value"} detached).
    """
    for name, t in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        if t is not None and t.shape != values.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal values shape {tuple(values.shape)}")
    mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
    returns, old_values = returns.detach(), old_values.detach()
    loss1 = (values - returns) ** 2
    if clip_eps is None:
        per = loss1
        clipped = torch.zeros_like(loss1, dtype=torch.bool)
    else:
        check_positive("clip_eps", clip_eps)
        v_clip = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        loss2 = (v_clip - returns) ** 2
        per = torch.maximum(loss1, loss2)
        clipped = loss2 > loss1
    loss = 0.5 * masked_mean(per, mask)
    metrics = {"val/clipfrac": masked_mean(clipped.float(), mask).detach(), "loss/value": loss.detach()}
    return loss, metrics
