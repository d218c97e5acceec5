"""The GRPO family: TRL 1.16 `GRPOTrainer._compute_loss`, every loss type, on per-token log-probs.

Notation (TRL's, `trl/trainer/grpo_trainer.py`): sequence i of B, completion token t of T, ℓ = log π(y_t),
ℓ_old the sampling-time policy's (the rollout's "old" log-probs), ρ = ℓ − ℓ_old, A the advantage ((B,) per
sequence or (B, T) per token), m the completion mask, |o_i| = Σ_t m_it, ε = `epsilon`, ε_h = `epsilon_high`
(default ε), δ = `delta`, sg = stop-gradient, GA = `gradient_accumulation_steps`.

    importance weight w:   token: w_it = e^{ρ_it};   sequence (GSPO): w_i = exp(Σ_t m_it ρ_it / |o_i|)
    per-token loss by `loss_type` (the LOSS_TYPES table):
      grpo, bnpo, dr_grpo, dapo, luspo:  −min(w̃·A, clip(w, 1 − ε, 1 + ε_h)·A),  w̃ = min(w, δ) (two-sided)
      cispo:  −sg(min(w, ε_h)) · A · ℓ                                 (MiniMax-M1)
      sapo:   −(4/τ) σ(τ (w − 1)) · A,   τ = τ_pos if A > 0 else τ_neg (SAPO)
      vespo:  −sg(φ(W_i)) · A · ℓ,  W_i = exp(Σ_t m ρ) · Π_t r^IS_it,  φ(W) = e^λ W^k e^{−λW}, (k, λ) by the sign of A
    then × off-policy mask (DeepSeek-V3.2) × entropy mask (top-ρ tokens by entropy) × the vLLM importance-sampling
    ratio r^IS (not vespo, which takes it inside W), + β · k3(ℓ, ℓ_ref) (× w with `use_bias_correction_kl`),
    aggregated (the same table):
      grpo, sapo:           mean_i Σ_t m ℓ_it / max(|o_i|, 1)                        / GA
      bnpo:                 Σ m ℓ / max(Σ m, 1)                                       / GA
      dr_grpo:              Σ m ℓ / (B · max_completion_length)                        / GA
      dapo, cispo, vespo:   Σ m ℓ / (max(num_items_in_batch, 1) / P · GA / steps_per_generation)
      luspo:                mean_i Σ_t m ℓ_it                                         / GA
    minus `entropy_coef` · (Σ m′ H / max(Σ m′, 1)) / GA, m′ = m ∧ entropy mask.
The vLLM correction (computed at generation time in TRL, here from the sampler's per-token log-probs):
    log r^IS = m · (ℓ_old − ℓ_sampler) per token (`token_*`) or summed per sequence (`sequence_*`);
    `*_truncate`: r^IS clamped to [clip_min, clip_max];  `*_mask`: r^IS = 0 outside [clip_min, clip_max].

Everything is elementwise over (B, T) plus per-sequence sums: no host synchronisation (the entropy quantile
is a device-side sort), metrics are detached 0-d tensors with TRL's names. TRL gathers some metrics and the
entropy quantile across processes; here they are this call's (one process's) values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from fusealign.kernels import DEFAULT_CHUNK_BYTES, linear_logps

from .options import option_field, resolve_options

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _finite(name, value, *, low=None, low_open=False, none_ok=False):
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")


def check_vllm_is_options(o) -> None:
    """The four vllm_importance_sampling_* fields of an options bundle (GRPOOptions, PPOOptions: same names, same
    defaults, TRL 1.16's), validated once for both."""
    if o.vllm_importance_sampling_mode not in VLLM_IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode must be one of {VLLM_IS_MODES}, "
                         f"got {o.vllm_importance_sampling_mode!r}")
    lo, hi = o.vllm_importance_sampling_clip_min, o.vllm_importance_sampling_clip_max
    _finite("vllm_importance_sampling_clip_min", lo, none_ok=True)
    _finite("vllm_importance_sampling_clip_max", hi, none_ok=True)
    if lo is not None and hi is not None and lo >= hi:
        raise ValueError(f"vllm_importance_sampling_clip_min ({lo}) must be less than "
                         f"vllm_importance_sampling_clip_max ({hi})")
    if (o.vllm_importance_sampling_correction and o.vllm_importance_sampling_mode.endswith("_truncate")
            and lo is None and hi is None):
        raise ValueError("a *_truncate vllm_importance_sampling_mode needs vllm_importance_sampling_clip_min "
                         "or vllm_importance_sampling_clip_max")


@dataclass(frozen=True)
class GRPOOptions:
    """Every option of `grpo_loss` / `linear_grpo_loss`: TRL 1.16 `GRPOConfig`'s names, defaults and meanings."""

    loss_type: str = option_field("dapo", "grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo or vespo (README table)")
    epsilon: float = option_field(0.2, "ε: lower clip of the importance weight, 1 − ε")
    epsilon_high: Optional[float] = option_field(
        None, "ε_h: upper clip 1 + ε_h (clip-higher, DAPO recommends 0.28; default ε); cispo's ε_max, "
              "which caps the weight itself (ScaleRL recommends 5.0)")
    delta: Optional[float] = option_field(
        None, "two-sided clipping (INTELLECT-2): the unclipped weight is capped at δ, recommended > 1 + ε")
    importance_sampling_level: str = option_field(
        "token", "token (one weight per token) or sequence (GSPO: exp of the mean log-ratio per sequence)")
    beta: float = option_field(0.0, "β of the k3 KL to the reference (needs ref_logps); 0: no KL term")
    use_bias_correction_kl: bool = option_field(
        True, "multiply the per-token KL by the importance weight w (DeepSeek-V3.2's unbiased KL gradient)")
    max_completion_length: Optional[int] = option_field(
        None, "dr_grpo's constant: the loss sum is divided by B × this (TRL's GRPOConfig default is 512)")
    sapo_temperature_neg: float = option_field(1.05, "SAPO's gate temperature for tokens with A ≤ 0")
    sapo_temperature_pos: float = option_field(1.0, "SAPO's gate temperature for tokens with A > 0")
    vespo_k_pos: float = option_field(2.0, "VESPO's power k for A ≥ 0")
    vespo_lambda_pos: float = option_field(3.0, "VESPO's decay λ for A ≥ 0")
    vespo_k_neg: float = option_field(3.0, "VESPO's power k for A < 0")
    vespo_lambda_neg: float = option_field(2.0, "VESPO's decay λ for A < 0")
    top_entropy_quantile: float = option_field(
        1.0, "ρ of 'Beyond the 80/20 rule': keep only the top-ρ quantile of tokens by entropy in the policy "
             "term (needs entropy; 1: every token)")
    entropy_coef: float = option_field(
        0.0, "entropy bonus: subtract coef × the mean entropy over the policy term's tokens (needs entropy)")
    off_policy_mask_threshold: Optional[float] = option_field(
        None, "DeepSeek-V3.2's off-policy sequence mask: drop a sequence with A < 0 whose mean "
              "(ℓ_sampler − ℓ) exceeds this (ℓ_sampler: sampling_logps, else old_logps)")
    vllm_importance_sampling_correction: bool = option_field(
        True, "when sampling_logps are given, multiply the loss by the sampler-mismatch ratio π_old/π_sampler")
    vllm_importance_sampling_mode: str = option_field(
        "sequence_mask", "token_truncate, token_mask, sequence_truncate or sequence_mask")
    vllm_importance_sampling_clip_min: Optional[float] = option_field(
        None, "C_min of the vLLM ratio (truncate: clamp from below; mask: zero below)")
    vllm_importance_sampling_clip_max: Optional[float] = option_field(
        3.0, "C_max of the vLLM ratio (truncate: clamp from above; mask: zero above)")
    gradient_accumulation_steps: int = option_field(
        1, "GA: micro-batches per optimizer step; every loss type but dapo/cispo/vespo is divided by it "
           "(1 for evaluation, as TRL)")
    steps_per_generation: Optional[int] = option_field(
        None, "micro-batches one generation batch spans (num_items_in_batch counts it); default GA")
    num_processes: int = option_field(1, "P: data-parallel ranks num_items_in_batch is counted over")

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be 'token' or 'sequence' (GSPO), "
                             f"got {self.importance_sampling_level!r}")
        _finite("epsilon", self.epsilon, low=0)
        _finite("epsilon_high", self.epsilon_high, low=0, none_ok=True)
        _finite("delta", self.delta, low=0, low_open=True, none_ok=True)
        _finite("beta", self.beta, low=0)
        for name in ("sapo_temperature_neg", "sapo_temperature_pos"):
            _finite(name, getattr(self, name), low=0, low_open=True)
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            _finite(name, getattr(self, name), low=0)
        _finite("entropy_coef", self.entropy_coef)
        if not (isinstance(self.top_entropy_quantile, (int, float)) and 0 <= self.top_entropy_quantile <= 1):
            raise ValueError(f"top_entropy_quantile must lie in [0, 1], got {self.top_entropy_quantile!r}")
        _finite("off_policy_mask_threshold", self.off_policy_mask_threshold, low=0, none_ok=True)
        if self.max_completion_length is not None and not (isinstance(self.max_completion_length, int)
                                                            and self.max_completion_length > 0):
            raise ValueError(f"max_completion_length must be a positive int, got {self.max_completion_length!r}")
        for name in ("gradient_accumulation_steps", "num_processes", "steps_per_generation"):
            v = getattr(self, name)
            if not (v is None and name == "steps_per_generation") and not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        check_vllm_is_options(self)

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def needs_entropy(self) -> bool:
        return self.top_entropy_quantile < 1.0 or self.entropy_coef != 0.0


# --- what every loss type reads ---------------------------------------------------------------------------
class Terms(NamedTuple):
    """One batch as the loss table reads it. (B, T) unless noted; `w` is (B, 1) at the sequence level."""

    logps: torch.Tensor               # ℓ (with gradient)
    log_ratio: torch.Tensor           # ρ = ℓ − ℓ_old, 0 off the mask
    w: torch.Tensor                   # importance weight (token or sequence level), with gradient
    advantages: torch.Tensor          # A: (B, 1) or (B, T)
    mask: torch.Tensor                # bool
    is_ratio: Optional[torch.Tensor]  # the vLLM ratio r^IS ((B, T) or (B, 1)), a constant, or None
    o: GRPOOptions


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's `global_masked_mean` on one process: a (B, 1) tensor is one value per sequence (plain mean over B),
    a (B, T) one is averaged over the mask."""
    if x.shape[1] == 1:
        return x.sum() / max(x.shape[0], 1)
    return torch.where(mask, x, 0).sum() / mask.sum().clamp(min=1)


def _seq_means(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's `masked_seq_mean`: (B,) per-sequence means (NaN for an empty sequence, which nanmin/nanmax skip)."""
    if x.shape[1] == 1:
        return x[:, 0]
    return torch.where(mask, x, 0).sum(-1) / mask.sum(-1)


def _indicator(b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A bool tensor as 0/1 in at least float32 (TRL's `.float()`; float64 stays float64)."""
    return b.to(torch.promote_types(like.dtype, torch.float32))


def _nan_extreme(x: torch.Tensor, largest: bool) -> torch.Tensor:
    """TRL's nanmin / nanmax without boolean indexing (NaN when every entry is NaN)."""
    fill = -math.inf if largest else math.inf
    v = torch.where(x.isnan(), fill, x)
    v = v.max() if largest else v.min()
    return torch.where(x.isnan().all(), math.nan, v)


def _select(condition, if_true: float, if_false: float, like: torch.Tensor) -> torch.Tensor:
    """torch.where of two Python numbers in `like`'s dtype (a bare torch.where would give the default dtype)."""
    return torch.where(condition, like.new_tensor(if_true), like.new_tensor(if_false))


# --- the loss types: per-token loss and their own metrics -----------------------------------------------
def _clipped(t: Terms):
    """PPO's clipped surrogate on w (GRPO, DAPO, Dr. GRPO, BNPO, LUSPO; GSPO at the sequence level)."""
    o = t.o
    clipped = torch.clamp(t.w, 1 - o.epsilon, 1 + o.eps_high)
    w = t.w if o.delta is None else torch.clamp(t.w, max=o.delta)  # two-sided clipping, INTELLECT-2
    per_token = -torch.min(w * t.advantages, clipped * t.advantages)
    with torch.no_grad():  # TRL counts clipping on the δ-capped weight
        low = _indicator((w < 1 - o.epsilon) & (t.advantages < 0), w)
        high = _indicator((w > 1 + o.eps_high) & (t.advantages > 0), w)
        region = torch.maximum(low, high)
        metrics = {"clip_ratio/low_mean": _masked_mean(low, t.mask),
                   "clip_ratio/high_mean": _masked_mean(high, t.mask),
                   "clip_ratio/region_mean": _masked_mean(region, t.mask),
                   "clip_ratio/low_min": _nan_extreme(_seq_means(low, t.mask), largest=False),
                   "clip_ratio/high_max": _nan_extreme(_seq_means(high, t.mask), largest=True)}
    return per_token, metrics


def _cispo(t: Terms):
    """CISPO (MiniMax-M1): REINFORCE on ℓ weighted by the capped, stopped weight sg(min(w, ε_h))."""
    capped = torch.clamp(t.w, max=t.o.eps_high).detach()
    with torch.no_grad():
        clipped = _indicator((t.w > t.o.eps_high) & (t.advantages > 0), t.w)
    return -capped * t.advantages * t.logps, {"cispo_clip_ratio": _masked_mean(clipped, t.mask)}


def _sapo(t: Terms):
    """SAPO: a smooth gate (4/τ) σ(τ (w − 1)) in place of the hard clip; slope 1 at w = 1."""
    tau = _select(t.advantages > 0, t.o.sapo_temperature_pos, t.o.sapo_temperature_neg, t.w)
    return -torch.sigmoid(tau * (t.w - 1)) * 4 / tau * t.advantages, {}


LOG_W_MIN = math.log(1e-8)  # VESPO's clamp of log W (as TRL, to match the original implementation)


@torch.no_grad()
def gamma_weights(t: Terms) -> torch.Tensor:
    """VESPO's φ(W) = exp(λ + k log W − λ W) per sequence, (B, 1) (or (B, T) for per-token advantages), a constant.

    log W = clamp(Σ_t m clamp(ρ, ±20) + Σ_t clamp(log r^IS, log 1e-8, 20), log 1e-8, 20): the sequence's whole
    log-ratio (a sum, not GSPO's mean), with the token-level vLLM ratios when given; (k, λ) = (k_pos, λ_pos) for
    A ≥ 0, else (k_neg, λ_neg), λ ≥ 1e-4; φ(1) = 1 and a non-finite φ is 0."""
    o = t.o
    log_w = torch.where(t.mask, t.log_ratio.clamp(-20.0, 20.0), 0).sum(-1, keepdim=True)
    if t.is_ratio is not None:
        log_w = log_w + t.is_ratio.log().clamp(LOG_W_MIN, 20.0).sum(-1, keepdim=True)
    log_w = log_w.clamp(LOG_W_MIN, 20.0)
    nonneg = t.advantages >= 0
    k = _select(nonneg, o.vespo_k_pos, o.vespo_k_neg, log_w)
    lam = _select(nonneg, o.vespo_lambda_pos, o.vespo_lambda_neg, log_w).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _vespo(t: Terms):
    """VESPO: REINFORCE on ℓ weighted by the Gamma weight of the sequence's importance ratio."""
    phi = gamma_weights(t)
    return -phi * t.advantages * t.logps, {"vespo/phi_seq_mean": _masked_mean(phi, t.mask)}


# --- aggregations: (per-token loss, 0 off the mask) -> (policy loss, its divisor) -------------------------
def _sequence_mean(lm, mask, o, norm):
    return (lm.sum(-1) / mask.sum(-1).clamp(min=1)).mean(), o.gradient_accumulation_steps


def _token_mean(lm, mask, o, norm):
    return lm.sum() / mask.sum().clamp(min=1), o.gradient_accumulation_steps


def _constant(lm, mask, o, norm):
    return lm.sum() / (lm.shape[0] * o.max_completion_length), o.gradient_accumulation_steps


def _global_tokens(lm, mask, o, norm):
    return lm.sum() / norm, 1  # `norm` already spans the accumulation window and the ranks


def _sequence_sum(lm, mask, o, norm):
    return lm.sum(-1).mean(), o.gradient_accumulation_steps


class LossType(NamedTuple):
    per_token: Callable    # Terms -> (per-token loss (B, T) or (B, 1), metrics)
    aggregate: Callable    # (masked per-token loss, mask, options, token normaliser) -> (loss, divisor)
    paper: str


LOSS_TYPES = {
    "grpo": LossType(_clipped, _sequence_mean, "GRPO: DeepSeekMath, Shao et al. 2024 (arXiv 2402.03300)"),
    "bnpo": LossType(_clipped, _token_mean, "TRL's local-batch token mean (no paper named by TRL)"),
    "dr_grpo": LossType(_clipped, _constant, "Dr. GRPO, Liu et al. 2025 (arXiv 2503.20783)"),
    "dapo": LossType(_clipped, _global_tokens, "DAPO, Yu et al. 2025 (arXiv 2503.14476)"),
    "cispo": LossType(_cispo, _global_tokens, "CISPO: MiniMax-M1, MiniMax 2025 (arXiv 2506.13585)"),
    "sapo": LossType(_sapo, _sequence_mean, "SAPO, Gao et al. 2025 (arXiv 2511.20347)"),
    "luspo": LossType(_clipped, _sequence_sum, "LUSPO, 2026 (arXiv 2602.05261)"),
    "vespo": LossType(_vespo, _global_tokens, "VESPO, 2026 (arXiv 2602.10693)"),
}


# --- masks and the vLLM correction -------------------------------------------------------------------------
@torch.no_grad()
def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """(B, T) bool: valid tokens whose entropy is ≥ the (1 − top_quantile) quantile of the valid tokens' entropies
    (linear interpolation, exactly `torch.quantile`'s, without a host sync: the valid values are sorted first)."""
    e = entropy.float() if entropy.dtype in (torch.float16, torch.bfloat16) else entropy
    n = mask.sum()
    values = torch.where(mask, e, math.inf).flatten().sort().values
    pos = torch.tensor(1.0 - top_quantile, dtype=e.dtype, device=e.device) * (n - 1).clamp(min=0).to(e.dtype)
    below, above = pos.long(), pos.ceil().long()
    threshold = torch.lerp(values[below.view(1)], values[above.view(1)], pos - below)
    return (torch.where(mask, e, 0) >= threshold) & mask


@torch.no_grad()
def off_policy_mask(advantages, logps, sampling_logps, mask, threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (its Eq. 9, as TRL cites it): keep a sequence unless A < 0 and
    its mean (ℓ_sampler − ℓ) over the mask exceeds the threshold. (B, 1) (or like advantages) float; NaN sampler
    log-probs count as 0."""
    kl = torch.nan_to_num(sampling_logps - logps.detach(), nan=0.0)
    mean_kl = torch.where(mask, kl, 0).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return ((advantages >= 0) | (mean_kl <= threshold)).to(logps.dtype)


@torch.no_grad()
def vllm_importance_ratio(old_logps, sampling_logps, mask, o):
    """The sampler-mismatch ratio r^IS = π_old / π_sampler (TRL computes it at generation time) and TRL's
    `sampling/*` metrics. (B, T) for token_* modes, (B, 1) for sequence_* modes; a NaN sampler log-prob
    (vLLM could not score the token) gives no correction (log r = 0) and is left out of the difference metrics.
    `o`: any bundle with the vllm_importance_sampling_* fields (GRPOOptions, PPOOptions). Token modes also take
    flat (N,) tokens."""
    mf = mask.to(old_logps.dtype)
    log_r = torch.nan_to_num((old_logps - sampling_logps) * mf, nan=0.0)
    mode, lo, hi = o.vllm_importance_sampling_mode, o.vllm_importance_sampling_clip_min, \
        o.vllm_importance_sampling_clip_max
    per_sequence = mode.startswith("sequence")
    if per_sequence:
        log_r = log_r.sum(-1, keepdim=True)
    ratio = torch.exp(log_r)
    if mode.endswith("_truncate"):
        ratio = torch.clamp(ratio, min=lo, max=hi)
    else:
        lo, hi = (-math.inf if lo is None else lo), (math.inf if hi is None else hi)
        ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
    diff = (old_logps - sampling_logps).abs()
    ok = mask & ~diff.isnan()
    n_ok = ok.sum()
    over = torch.ones_like(ratio, dtype=torch.bool) if per_sequence else mask
    n_over = over.sum()

    def when_any(n, v):  # TRL reports 0 for an empty selection
        return torch.where(n > 0, v, 0.0)

    metrics = {
        "sampling/sampling_logp_difference/mean": when_any(n_ok, torch.where(ok, diff, 0).sum() / n_ok.clamp(min=1)),
        "sampling/sampling_logp_difference/max": when_any(n_ok, torch.where(ok, diff, -math.inf).max()),
        "sampling/importance_sampling_ratio/min": when_any(n_over, torch.where(over, ratio, math.inf).min()),
        "sampling/importance_sampling_ratio/mean": when_any(
            n_over, torch.where(over, ratio, 0).sum() / n_over.clamp(min=1)),
        "sampling/importance_sampling_ratio/max": when_any(n_over, torch.where(over, ratio, -math.inf).max()),
    }
    return ratio, metrics


# --- the loss ------------------------------------------------------------------------------------------------
def _check_tensors(logps, old_logps, advantages, mask, ref_logps, sampling_logps, entropy):
    if logps.dim() != 2:
        raise ValueError(f"logps must be (B, T) (completion tokens, right-padded), got shape {tuple(logps.shape)}")
    for name, t in (("old_logps", old_logps), ("mask", mask), ("ref_logps", ref_logps),
                    ("sampling_logps", sampling_logps), ("entropy", entropy)):
        if t is not None and t.shape != logps.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal logps shape {tuple(logps.shape)}")
    if tuple(advantages.shape) not in ((logps.shape[0],), tuple(logps.shape)):
        raise ValueError(f"advantages shape {tuple(advantages.shape)} must be (B,) = ({logps.shape[0]},) or the "
                         f"token shape {tuple(logps.shape)}")


def _token_normaliser(num_items_in_batch, mask, o: GRPOOptions, dtype) -> torch.Tensor:
    """dapo / cispo / vespo's divisor: num_items_in_batch (active tokens of the whole generation batch, all ranks;
    default: this call's) rescaled to one accumulation window on one rank, as TRL."""
    n = mask.sum() if num_items_in_batch is None else num_items_in_batch
    n = torch.as_tensor(n, device=mask.device).to(dtype).clamp(min=1.0)
    spg = o.gradient_accumulation_steps if o.steps_per_generation is None else o.steps_per_generation
    return n / o.num_processes * o.gradient_accumulation_steps / spg


def grpo_loss(
    logps: torch.Tensor,
    old_logps: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: Optional[torch.Tensor] = None,
    sampling_logps: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    options: Optional[GRPOOptions] = None,
    **overrides,
):
    """TRL 1.16 `GRPOTrainer`'s policy loss on per-token log-probs: the tensor-level twin of `linear_grpo_loss`.

        loss, metrics = fa.grpo_loss(logps, old_logps, advantages, mask, loss_type="dapo", epsilon=0.2,
                                     epsilon_high=None, delta=None, importance_sampling_level="token", beta=0.0,
                                     ref_logps=None, max_completion_length=None, …)

    logps (with gradient), old_logps (None: on-policy, ℓ_old = sg(ℓ)), ref_logps (needed when beta > 0),
    sampling_logps (the sampler's own log-probs, e.g. vLLM's: the rollout-mismatch correction and the
    off-policy mask's reference), entropy (needed by top_entropy_quantile < 1 and entropy_coef; logged as
    `entropy`), mask (bool/int): (B, T) right-padded completion tokens; advantages: (B,) or (B, T).
    num_items_in_batch: TRL's — active tokens of the whole generation batch over every rank (int or 0-d tensor;
    default: this call's), the dapo / cispo / vespo denominator. Options: `options=GRPOOptions(...)` and/or
    keywords of the same names (module docstring for the math; README for each loss type).
    Returns (loss: 0-d, scaled for gradient accumulation as TRL's; metrics: dict of detached 0-d tensors with
    TRL's names — entropy, kl, clip_ratio/{low_mean, high_mean, region_mean, low_min, high_max} (clipped types),
    cispo_clip_ratio, vespo/phi_seq_mean, sampling/{sampling_logp_difference/{mean, max},
    importance_sampling_ratio/{min, mean, max}} (vLLM correction), policy_loss and entropy_coef).
    """
    o = resolve_options(GRPOOptions, options, overrides, caller="grpo_loss")
    # Checked here, not in the bundle: a trainer may fill it from its own layout after building the options.
    if o.loss_type == "dr_grpo" and o.max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' divides by B × max_completion_length: pass max_completion_length "
                         "(the longest completion the sampler may produce; TRL's default is 512)")
    _check_tensors(logps, old_logps, advantages, mask, ref_logps, sampling_logps, entropy)
    if o.beta != 0.0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the reference policy's log-probs of the same tokens)")
    if o.needs_entropy and entropy is None:
        raise ValueError("top_entropy_quantile < 1 and entropy_coef != 0 need the per-token entropy (entropy=)")
    dtype = logps.dtype
    mask = mask.bool()
    A = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).to(dtype)
    old = logps.detach() if old_logps is None else old_logps.detach().to(dtype)
    sampling = None if sampling_logps is None else sampling_logps.detach().to(dtype)
    metrics = {}

    is_ratio = None
    if sampling is not None and o.vllm_importance_sampling_correction:
        if o.loss_type == "vespo" and o.vllm_importance_sampling_mode.startswith("sequence"):
            raise ValueError(f"loss_type='vespo' takes per-token vLLM ratios inside its Gamma weight: "
                             f"vllm_importance_sampling_mode must be token_truncate or token_mask, got "
                             f"{o.vllm_importance_sampling_mode!r} (or pass vllm_importance_sampling_correction=False)")
        is_ratio, is_metrics = vllm_importance_ratio(old, sampling, mask, o)
        metrics.update(is_metrics)
    keep = None
    if o.off_policy_mask_threshold is not None:
        keep = off_policy_mask(A, logps, old if sampling is None else sampling, mask, o.off_policy_mask_threshold)
    entropy_mask = None
    if o.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropy.detach(), mask, o.top_entropy_quantile)

    log_ratio = torch.where(mask, logps - old, 0)  # 0 off the mask: no e^{garbage} · 0 there
    if o.importance_sampling_level == "token":
        log_w = log_ratio
    else:  # GSPO: the mean log-ratio of the sequence
        log_w = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    w = torch.exp(log_w)

    per_token_kl = None
    if o.beta != 0.0:
        d = torch.where(mask, ref_logps.detach().to(dtype) - logps, 0)
        per_token_kl = torch.expm1(d) - d  # k3 = e^d − d − 1 (Schulman 2020); expm1 keeps it exact near d = 0
        if o.use_bias_correction_kl:
            per_token_kl = per_token_kl * w

    kind = LOSS_TYPES[o.loss_type]
    per_token, type_metrics = kind.per_token(Terms(logps, log_ratio, w, A, mask, is_ratio, o))
    metrics.update(type_metrics)
    if keep is not None:
        per_token = per_token * keep
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    if is_ratio is not None and o.loss_type != "vespo":  # vespo took it inside its Gamma weight
        per_token = per_token * is_ratio
    if per_token_kl is not None:
        per_token = per_token + o.beta * per_token_kl

    norm = _token_normaliser(num_items_in_batch, mask, o, dtype) if kind.aggregate is _global_tokens else None
    policy_loss, divisor = kind.aggregate(torch.where(mask, per_token, 0), mask, o, norm)
    loss = policy_loss / divisor

    if o.entropy_coef != 0.0:  # the mean entropy over the policy term's tokens, never a loss type's normaliser
        tokens = mask if entropy_mask is None else mask & entropy_mask
        mean_entropy = torch.where(tokens, entropy, 0).sum() / tokens.sum().clamp(min=1)
        loss = loss - o.entropy_coef * mean_entropy / o.gradient_accumulation_steps

    with torch.no_grad():
        if per_token_kl is not None:
            metrics["kl"] = _masked_mean(per_token_kl, mask)
        if entropy is not None:
            metrics["entropy"] = _masked_mean(entropy.detach(), mask)
        metrics["policy_loss"] = policy_loss.detach()
        if o.entropy_coef != 0.0:
            metrics["entropy_coef"] = logps.new_tensor(float(o.entropy_coef))
    return loss, {k: v.detach() for k, v in metrics.items()}


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logps: Optional[torch.Tensor],
    advantages: torch.Tensor,
    *,
    ref_logps: Optional[torch.Tensor] = None,
    sampling_logps: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    options: Optional[GRPOOptions] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    softcap: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    group=None,
    **overrides,
):
    """Fused GRPO-family loss from hidden states: `linear_logps` (log-probs and entropy in one pass) + `grpo_loss`.

    hidden: (B, T, H) at the completion positions (right-padded), weight: (V, H), bias: (V,) or None,
    targets: (B, T) with `ignore_index` off the completion (the mask is `targets != ignore_index`);
    old_logps, ref_logps, sampling_logps: (B, T); advantages: (B,) or (B, T). Options and metrics are
    `grpo_loss`'s (same `options=` / keywords). The entropy comes from the same fused pass (the kernels compute
    it with the log-probs); it gets a gradient only through `entropy_coef`. No (N, V) logits exist; gradients
    reach hidden, weight and bias through linear_logps's backward. Vocabulary-parallel heads as `linear_logps`.
    Returns (loss: 0-d, metrics: dict of detached 0-d tensors).
    """
    o = resolve_options(GRPOOptions, options, overrides, caller="linear_grpo_loss")
    if hidden.dim() != 3 or targets.dim() != 2 or tuple(hidden.shape[:2]) != tuple(targets.shape):
        raise ValueError(f"linear_grpo_loss needs hidden (B, T, H) and targets (B, T), got {tuple(hidden.shape)} "
                         f"and {tuple(targets.shape)}")
    logps, entropy = linear_logps(hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                                  ignore_index=ignore_index, return_entropy=True, backend=backend,
                                  chunk_bytes=chunk_bytes, vocab_start=vocab_start, vocab_size=vocab_size,
                                  group=group)
    return grpo_loss(logps, old_logps, advantages, targets != ignore_index, ref_logps=ref_logps,
                     sampling_logps=sampling_logps, entropy=entropy, num_items_in_batch=num_items_in_batch,
                     options=o)


