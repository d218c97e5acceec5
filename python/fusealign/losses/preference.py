"""Preference losses on the fused core: the DPO family and fused DPO from hidden states (Bradley-Terry: reward.py).

Each loss is the fused log-prob core plus a small epilogue on (B,) sequence log-probs, so no (N, V)
tensor exists and gradients reach `hidden`/`weight` only through linear_logps's backward. The DPO family
is a table of functions of one `Pairs` batch: PAIR_LOSSES (entry b depends on pair b only) and
BATCH_LOSSES (`aot`, `aot_unpaired` sort across the batch; `sft` is a token mean over it), with TRL 1.16's
names, options and numbers; f-divergence scores, several losses at once and WPO weights are applied
around the table, once, in `dpo_loss`.
Metrics are returned as detached 0-d tensors (no `.item()`, no host sync); log them when you like.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from fusealign.kernels import DEFAULT_CHUNK_BYTES, linear_logps, segment_sum
from fusealign.kernels.checks import check_positive, device_assert

from .options import option_field, resolve_options


# --- what every DPO-family loss reads ---------------------------------------------------------------
# Notation (TRL 1.16's, `trl/trainer/dpo_trainer.py`): for pair b, π_w = log π(y_w|x), π_l = log π(y_l|x)
# (sums over completion tokens), ref_w / ref_l the reference's, ρ = π − ref the log-ratios, r = β·ρ the
# implicit rewards, s = f′-score of ρ (= ρ under the default reverse KL), Δs = s_w − s_l, and
# |y| the completion-token count.
class Pairs(NamedTuple):
    """A batch of B preference pairs as the loss table reads it; every field (B,) or None."""

    chosen_logps: torch.Tensor                   # π_w (sums; per-token means with average_logps)
    rejected_logps: torch.Tensor                 # π_l
    ref_chosen_logps: Optional[torch.Tensor]     # ref_w, detached (None when every loss is reference-free)
    ref_rejected_logps: Optional[torch.Tensor]   # ref_l
    chosen_scores: Optional[torch.Tensor]        # s_w = f′-score of ρ_w (ρ_w under reverse KL)
    rejected_scores: Optional[torch.Tensor]      # s_l
    chosen_lengths: Optional[torch.Tensor]       # |y_w| (completion tokens), when given
    rejected_lengths: Optional[torch.Tensor]     # |y_l|


def _logratios(p: Pairs):
    return p.chosen_logps - p.ref_chosen_logps, p.rejected_logps - p.ref_rejected_logps


def _smoothed_logistic(x, eps):
    """−(1−ε) log σ(x) − ε log σ(−x): the logistic loss on a preference whose label is flipped w.p. ε."""
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def _length_normalised_margin(p: Pairs):
    """s_w/|y_w| − s_l/|y_l| (a count of 0 is read as 1, as TRL's clamp)."""
    return (p.chosen_scores / p.chosen_lengths.clamp(min=1).to(p.chosen_scores.dtype)
            - p.rejected_scores / p.rejected_lengths.clamp(min=1).to(p.rejected_scores.dtype))


# --- per-pair losses: loss_b depends on pair b only -----------------------------------------------------
def _sigmoid(p: Pairs, o: DPOOptions):
    """DPO (Rafailov et al. 2023, Eq. 7): −log σ(β Δs). TRL 1.16's `sigmoid` reads no label smoothing
    (its conservative form is `cdpo`)."""
    return -F.logsigmoid(o.beta * (p.chosen_scores - p.rejected_scores))


def _cdpo(p: Pairs, o: DPOOptions):
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"; TRL ≤ 0.19's `sigmoid` with
    label_smoothing, fusealign's `sigmoid` before TRL 1.16 parity): −(1−ε) log σ(βΔs) − ε log σ(−βΔs)."""
    return _smoothed_logistic(o.beta * (p.chosen_scores - p.rejected_scores), o.label_smoothing)


def _robust(p: Pairs, o: DPOOptions):
    """Robust DPO (Chowdhury et al. 2024, Eq. 9): [−(1−ε) log σ(βΔs) + ε log σ(−βΔs)] / (1 − 2ε), an
    unbiased estimate of the clean loss when each label is flipped with probability ε."""
    eps, x = o.label_smoothing, o.beta * (p.chosen_scores - p.rejected_scores)
    return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


def _hinge(p: Pairs, o: DPOOptions):
    """SLiC-HF calibration hinge (Zhao et al. 2023, §2; on policy/reference log-ratios as in RSO, Liu et al.
    2023): max(0, 1 − βΔs), i.e. a margin of 1/β on Δs."""
    return torch.relu(1 - o.beta * (p.chosen_scores - p.rejected_scores))


def _ipo(p: Pairs, o: DPOOptions):
    """IPO (Azar et al. 2023, Eq. 17, τ = β) on length-normalised scores, TRL's documented choice:
    (s_w/|y_w| − s_l/|y_l| − 1/(2β))². The unnormalised form is `ipo_sum`."""
    return (_length_normalised_margin(p) - 1 / (2 * o.beta)) ** 2


def _ipo_sum(p: Pairs, o: DPOOptions):
    """IPO, Eq. 17 of Azar et al. 2023 as written, on sequence sums (no length normalisation; fusealign's
    `ipo` before TRL 1.16 parity): (Δs − 1/(2β))²."""
    return (p.chosen_scores - p.rejected_scores - 1 / (2 * o.beta)) ** 2


def _sigmoid_norm(p: Pairs, o: DPOOptions):
    """Length-normalised DPO (as in Tülu 3, Lambert et al. 2024, on Eq. 7 of Rafailov et al.):
    −log σ(β (s_w/|y_w| − s_l/|y_l|))."""
    return -F.logsigmoid(o.beta * _length_normalised_margin(p))


def _exo_pair(p: Pairs, o: DPOOptions):
    """EXO-pref with K = 2 (Ji et al. 2024, Eq. 16): KL(q ‖ p_ε) between q = (σ(βΔs), σ(−βΔs)) and the
    ε-smoothed label p_ε = (1−ε, ε): q_w (log q_w − log(1−ε)) + q_l (log q_l − log ε). Needs ε > 0
    (the paper uses 1e-3)."""
    eps, x = o.label_smoothing, o.beta * (p.chosen_scores - p.rejected_scores)
    return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))


def _nca_pair(p: Pairs, o: DPOOptions):
    """NCA on a pair (Chen et al. 2024, §4.1): −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l), r = β ρ —
    absolute likelihoods, so the chosen log-ratio is pushed up rather than only the margin."""
    rho_w, rho_l = _logratios(p)
    r_w, r_l = o.beta * rho_w, o.beta * rho_l
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def _bco_pair(p: Pairs, o: DPOOptions):
    """BCO on a pair (Jung et al. 2024, the binary cross-entropy of their Theorem 1, without the reward
    shift, as TRL 1.16): −log σ(r_w) − log σ(−r_l), r = β ρ."""
    rho_w, rho_l = _logratios(p)
    return -F.logsigmoid(o.beta * rho_w) - F.logsigmoid(-o.beta * rho_l)


def _sppo_hard(p: Pairs, o: DPOOptions):
    """SPPO with hard preferences (Wu et al. 2024, Eq. 4.7 with P(y_w ≻ y_l) = 1, P(y_l ≻ y_w) = 0):
    (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²."""
    rho_w, rho_l = _logratios(p)
    return (rho_w - 0.5 / o.beta) ** 2 + (rho_l + 0.5 / o.beta) ** 2


def _apo_zero(p: Pairs, o: DPOOptions):
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): 1 − σ(r_w) + σ(r_l) — raise the winner, lower the loser."""
    rho_w, rho_l = _logratios(p)
    return 1 - torch.sigmoid(o.beta * rho_w) + torch.sigmoid(o.beta * rho_l)


def _apo_down(p: Pairs, o: DPOOptions):
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): σ(r_w) + 1 − σ(r_w − r_l) — lower both, the loser more."""
    rho_w, rho_l = _logratios(p)
    return torch.sigmoid(o.beta * rho_w) + 1 - torch.sigmoid(o.beta * (rho_w - rho_l))


def _discopop(p: Pairs, o: DPOOptions):
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, Eq. 5): with x = βΔs and m = σ(x/τ),
    (1 − m)·(−log σ(x)) + m·e^{−x} — logistic for x ≪ 0, exponential for x ≫ 0."""
    x = o.beta * (p.chosen_scores - p.rejected_scores)
    m = torch.sigmoid(x / o.discopop_tau)
    return -F.logsigmoid(x) * (1 - m) + torch.exp(-x) * m


def _simpo(p: Pairs, o: DPOOptions):
    """SimPO (Meng et al. 2024, Eq. 6): −log σ(β(π_w − π_l) − γ) on the caller's length-normalised policy
    log-probs (no reference); label smoothing as in `cdpo`."""
    return _smoothed_logistic(o.beta * (p.chosen_logps - p.rejected_logps) - o.simpo_gamma, o.label_smoothing)


PAIR_LOSSES = {
    "sigmoid": _sigmoid, "cdpo": _cdpo, "robust": _robust, "hinge": _hinge, "ipo": _ipo, "ipo_sum": _ipo_sum,
    "sigmoid_norm": _sigmoid_norm, "exo_pair": _exo_pair, "nca_pair": _nca_pair, "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard, "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop, "simpo": _simpo,
}


# --- batch losses: entry b depends on the whole batch ------------------------------------------------------
def _aot(p: Pairs, o: DPOOptions):
    """AOT, paired (Melnyk et al. 2024, §3): first-order stochastic dominance of the policy's chosen-vs-rejected
    margin over the reference's, through their sorted quantiles: δ_(k) = sort(π_w − π_l)_k − sort(ref_w − ref_l)_k,
    loss_k = −(1−ε) log σ(βδ_(k)) − ε log σ(−βδ_(k)). Entry k is the k-th quantile, not pair k."""
    margin, _ = torch.sort(p.chosen_logps - p.rejected_logps, dim=0)
    ref_margin, _ = torch.sort(p.ref_chosen_logps - p.ref_rejected_logps, dim=0)
    return _smoothed_logistic(o.beta * (margin - ref_margin), o.label_smoothing)


def _aot_unpaired(p: Pairs, o: DPOOptions):
    """AOT, unpaired (Melnyk et al. 2024, §3): dominance of the chosen log-ratios over the rejected ones,
    δ_(k) = sort(ρ_w)_k − sort(ρ_l)_k, with the smoothed logistic loss of `aot`."""
    rho_w, rho_l = _logratios(p)
    delta = torch.sort(rho_w, dim=0)[0] - torch.sort(rho_l, dim=0)[0]
    return _smoothed_logistic(o.beta * delta, o.label_smoothing)


def _sft(p: Pairs, o: DPOOptions):
    """NLL of the chosen completions, a token mean over the batch: −Σ_b π_w,b / Σ_b |y_w,b|, the same value in
    every entry. With `loss_type=["sigmoid", "sft"], loss_weights=[1, α]` it is RPO (Pang et al. 2024), and
    with ["sigmoid", "bco_pair", "sft"] MPO (Wang et al. 2024)."""
    lengths = p.chosen_lengths.to(p.chosen_logps.dtype)
    total = (p.chosen_logps * lengths if o.per_token_means else p.chosen_logps).sum()
    return (-total / lengths.sum().clamp(min=1)).expand(p.chosen_logps.shape[0])


BATCH_LOSSES = {"aot": _aot, "aot_unpaired": _aot_unpaired, "sft": _sft}
LOSS_TYPES = {**PAIR_LOSSES, **BATCH_LOSSES}

REFERENCE_FREE = frozenset({"simpo", "sft"})
BATCH_SORTED = frozenset({"aot", "aot_unpaired"})           # per-pair (WPO) weights would be misaligned
LENGTH_NORMALISED = frozenset({"ipo", "sigmoid_norm"})      # divide the scores by |y| themselves
NEEDS_LENGTHS = LENGTH_NORMALISED | {"sft"}
LABEL_SMOOTHED = frozenset({"cdpo", "robust", "exo_pair", "aot", "aot_unpaired", "simpo"})  # read ε


# --- f-divergence scores (f-DPO, Wang et al. 2024): s = f′(π/π_ref) as a function of ρ = log(π/π_ref) -----
def _reverse_kl(rho, alpha):
    """f(u) = u log u: s = ρ (DPO)."""
    return rho


def _forward_kl(rho, alpha):
    """f(u) = −log u: s = 1 − e^{−ρ} (f′ = −1/u, shifted by 1 as TRL)."""
    return 1 - torch.exp(-rho)


def _js_divergence(rho, alpha):
    """Jensen-Shannon: f′(u) = log(2u/(1+u)), s = log 2 + log σ(ρ)."""
    return math.log(2) + F.logsigmoid(rho)


def _alpha_divergence(rho, alpha):
    """α-divergence in TRL's parametrisation: s = (e^{(α−1)ρ} − 1)/(α − 1) (f′(u) = (1 − u^{−a})/a of Wang et al.
    with a = 1 − α): α → 1 is reverse KL (s = ρ), α = 0 forward KL. As TRL, the exponent is clamped at 80
    (11 in fp16) and e^{·} taken in fp32 for 16-bit inputs."""
    if abs(alpha - 1.0) < 1e-6:
        return rho
    t = (alpha - 1.0) * rho
    t_wide = torch.clamp(t.to(torch.promote_types(t.dtype, torch.float32)),  # fp32 (fp64 stays fp64)
                         max=11.0 if t.dtype == torch.float16 else 80.0)
    return (torch.exp(t_wide) - 1.0).to(t.dtype) / (alpha - 1.0)


F_DIVERGENCES = {"reverse_kl": _reverse_kl, "forward_kl": _forward_kl, "js_divergence": _js_divergence,
                 "alpha_divergence": _alpha_divergence}
# TRL 1.16's rule: only the losses built on s_w − s_l generalise (the β log Z(x) term cancels in it).
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "cdpo", "robust", "hinge", "ipo", "ipo_sum", "sigmoid_norm", "exo_pair",
                                 "discopop", "sft"})


# --- the options, validated once ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DPOOptions:
    """Options of the DPO family, with TRL 1.16's names and meanings; checked here, once, whoever builds them
    (a caller, `linear_dpo_loss`'s keywords, the CLI's `fusealign dpo` flags). `loss_type` and `loss_weights` are
    stored as tuples; `average_logps=None` (unset) means per-token means for `simpo` alone (SimPO is defined on
    them), sums otherwise: `.per_token_means` is the resolved choice."""

    beta: float = option_field(0.1, "β: strength of the implicit KL to the reference (τ of IPO, 1/margin of the "
                                    "hinge)")
    loss_type: Union[str, tuple] = option_field("sigmoid", (
        "one or more DPO losses, summed with --loss-weights (TRL 1.16's names): sigmoid, hinge, ipo (length-"
        "normalised), exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, "
        "discopop, sft, sigmoid_norm; and cdpo (conservative DPO), ipo_sum (IPO on sums), simpo"), nargs="+")
    loss_weights: Optional[tuple] = option_field(None, "one weight per --loss-type (default 1 each), e.g. MPO: "
                                                       "--loss-type sigmoid bco_pair sft --loss-weights 0.8 0.2 1.0",
                                                 nargs="+", item=float)
    label_smoothing: float = option_field(0.0, "ε in [0, 0.5): flip probability of robust; cdpo, exo_pair, aot, "
                                               "aot_unpaired and simpo smoothing")
    simpo_gamma: float = option_field(0.0, "SimPO's target margin γ (loss_type simpo only; `gamma` is an alias)")
    f_divergence_type: str = option_field("reverse_kl", "reverse_kl, forward_kl, js_divergence or alpha_divergence "
                                                        "(f-DPO; for the losses on the chosen−rejected score difference)")
    f_alpha_divergence_coef: float = option_field(0.5, "α of alpha_divergence (TRL's parametrisation; 1 = reverse KL)")
    discopop_tau: float = option_field(0.05, "τ of the discopop loss")
    use_weighting: bool = option_field(False, "WPO: weight each pair by the policy's length-normalised probabilities "
                                              "(from the fused pass's log Σp², no logits)")
    average_logps: Optional[bool] = option_field(None, "the sequence log-probs are per-token means, not sums "
                                                       "(default: on for simpo alone; ipo and sigmoid_norm normalise "
                                                       "by themselves)")
    nll_coef: float = option_field(0.0, "RPO: weight of the chosen-completion NLL (= adding sft with this weight)")

    # Older spellings accepted as keywords: `gamma` is SimPO's margin here, PPO's discount elsewhere.
    ALIASES: ClassVar[dict] = {"gamma": "simpo_gamma"}

    def __post_init__(self):
        types = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        if not types:
            raise ValueError("loss_type must name at least one loss")
        for t in types:
            if t not in LOSS_TYPES:
                raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)} (or a list of them), got {t!r}")
        weights = None if self.loss_weights is None else tuple(float(w) for w in self.loss_weights)
        if weights is not None and len(weights) != len(types):
            raise ValueError(f"loss_weights must have one weight per loss type: {len(weights)} weights for "
                             f"{len(types)} types {list(types)}")
        check_positive("beta", self.beta)
        eps = self.label_smoothing
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {eps}")
        if eps and not LABEL_SMOOTHED & set(types):
            raise ValueError(f"label_smoothing={eps} is read by none of {list(types)} (only by "
                             f"{sorted(LABEL_SMOOTHED)}; TRL 1.16's sigmoid ignores it: conservative DPO is 'cdpo')")
        if "exo_pair" in types and not eps > 0:
            raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (the EXO paper uses 1e-3)")
        if self.simpo_gamma != 0.0 and "simpo" not in types:
            raise ValueError(f"simpo_gamma (gamma: the SimPO target margin) is only used by loss_type='simpo', got "
                             f"{list(types)}")
        check_positive("discopop_tau", self.discopop_tau)
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type must be one of {sorted(F_DIVERGENCES)}, got "
                             f"{self.f_divergence_type!r}")
        if self.f_divergence_type != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSSES:
            raise ValueError(f"f_divergence_type={self.f_divergence_type!r} applies only to "
                             f"{sorted(F_DIVERGENCE_LOSSES)} (losses on the chosen−rejected score difference), got "
                             f"{list(types)}")
        if not math.isfinite(self.f_alpha_divergence_coef):
            raise ValueError(f"f_alpha_divergence_coef must be finite, got {self.f_alpha_divergence_coef}")
        if self.use_weighting and BATCH_SORTED & set(types):
            raise ValueError(f"use_weighting (WPO) cannot combine with {sorted(BATCH_SORTED & set(types))}: they sort "
                             f"the batch, so per-pair weights would be misaligned")
        average = types == ("simpo",) if self.average_logps is None else bool(self.average_logps)
        if average and LENGTH_NORMALISED & set(types):
            raise ValueError(f"{sorted(LENGTH_NORMALISED & set(types))} normalise by completion length themselves; "
                             f"pass summed log-probs (average_logps=False), or use 'ipo_sum' on averaged ones")
        if not (math.isfinite(self.nll_coef) and self.nll_coef >= 0):
            raise ValueError(f"nll_coef must be >= 0, got {self.nll_coef}")
        for name, value in (("loss_type", types), ("loss_weights", weights)):
            object.__setattr__(self, name, value)  # normalised once; frozen afterwards

    @property
    def per_token_means(self) -> bool:
        """The sequence log-probs are per-token means (`average_logps`, or its default: simpo alone)."""
        return self.loss_type == ("simpo",) if self.average_logps is None else bool(self.average_logps)

    @property
    def terms(self) -> tuple:
        """((loss type, weight), …) summed into the loss: loss_type with loss_weights (1 each by default), and
        RPO's `("sft", nll_coef)` when nll_coef > 0 (exactly TRL 1.16's loss_type=[…, "sft"])."""
        weights = self.loss_weights or (1.0,) * len(self.loss_type)
        extra = (("sft", float(self.nll_coef)),) if self.nll_coef else ()
        return tuple(zip(self.loss_type, weights)) + extra

    @property
    def needs_reference(self) -> bool:
        return not {t for t, _ in self.terms} <= REFERENCE_FREE


def check_dpo_options(**options) -> tuple:
    """Validate DPO options (the fields of `DPOOptions`, or `gamma`); returns (loss types, weights) as tuples, RPO's
    nll_coef term included."""
    terms = resolve_options(DPOOptions, None, options, caller="check_dpo_options").terms
    return tuple(t for t, _ in terms), tuple(w for _, w in terms)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor],
    ref_rejected_logps: Optional[torch.Tensor],
    *,
    options: Optional[DPOOptions] = None,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    chosen_wpo_logps: Optional[torch.Tensor] = None,
    rejected_wpo_logps: Optional[torch.Tensor] = None,
    **loss_options,
):
    """DPO-family loss per pair: TRL 1.16 `DPOTrainer`'s loss on the same sequence log-probs.

    policy_/ref_ chosen/rejected logps: (B,) sequence log-probs — sums over completion tokens, as TRL
    (`average_logps=True`: you pass per-token means, for SimPO-style losses). The options are one `DPOOptions`
    (`options=`), or its fields as keywords (`beta=0.1, loss_type="ipo"`, …; with `options=` they replace its
    fields): `loss_type` a name in LOSS_TYPES or a list of them, summed with `loss_weights` (default 1 each), e.g.
    MPO = ["sigmoid", "bco_pair", "sft"] with [0.8, 0.2, 1.0]; `f_divergence_type` (+ `f_alpha_divergence_coef`)
    replaces the log-ratios ρ by f′-scores for the losses in F_DIVERGENCE_LOSSES; `use_weighting` (WPO, Zhou et al.
    2024, Eq. 2) multiplies each pair's loss by w_w·w_l, w = exp(`chosen_wpo_logps` / `rejected_wpo_logps`): (B,)
    means over completion tokens of log p(y_t) − log Σ_v p_v², constants (per-token from
    `fa.linear_logps(..., outputs=("logps", "log_sum_sq_probs"))`). `chosen_lengths`/`rejected_lengths` (B,):
    completion token counts, needed by `ipo`, `sigmoid_norm` and `sft`.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)): losses.mean() is TRL's loss (for the
    batch-sorted `aot`/`aot_unpaired`, entry k belongs to the k-th quantile, not pair k); rewards are
    β·(policy − ref) log-ratios (β·policy for reference-free losses given no reference), detached.
    """
    o = resolve_options(DPOOptions, options, loss_options, caller="dpo_loss")
    types = {t for t, _ in o.terms}
    shape = policy_chosen_logps.shape
    if policy_rejected_logps.shape != shape:
        raise ValueError(f"policy_rejected_logps shape {tuple(policy_rejected_logps.shape)} differs from "
                         f"policy_chosen_logps shape {tuple(shape)}: chosen and rejected must pair up (same B)")

    def check_pair(names, needed, why, hint=""):
        given = [t is not None for t in names.values()]
        if needed and not all(given):
            raise ValueError(f"{why} needs {' and '.join(names)}{hint}")
        for name, t in names.items():
            if t is not None and t.shape != shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} differs from policy_chosen_logps {tuple(shape)}")

    named = list(o.loss_type)
    check_pair(dict(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps), o.needs_reference,
               f"loss_type={named if len(named) > 1 else named[0]!r}")
    check_pair(dict(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths), bool(NEEDS_LENGTHS & types),
               f"loss_type {sorted(NEEDS_LENGTHS & types)}",
               " (completion-token counts: TRL's ipo and sigmoid_norm divide by them, sft averages over them; "
               "'ipo_sum' is IPO on sums)")
    check_pair(dict(chosen_wpo_logps=chosen_wpo_logps, rejected_wpo_logps=rejected_wpo_logps), o.use_weighting,
               "use_weighting (WPO)")
    if not o.use_weighting and (chosen_wpo_logps is not None or rejected_wpo_logps is not None):
        raise ValueError("chosen_wpo_logps/rejected_wpo_logps are WPO's weights: pass use_weighting=True as well")

    beta = o.beta
    if o.needs_reference or (ref_chosen_logps is not None and ref_rejected_logps is not None):  # vs the reference
        ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.detach(), ref_rejected_logps.detach()
        score = functools.partial(F_DIVERGENCES[o.f_divergence_type], alpha=o.f_alpha_divergence_coef)
        chosen_scores = score(policy_chosen_logps - ref_chosen_logps)
        rejected_scores = score(policy_rejected_logps - ref_rejected_logps)
        chosen_rewards = beta * (policy_chosen_logps.detach() - ref_chosen_logps)
        rejected_rewards = beta * (policy_rejected_logps.detach() - ref_rejected_logps)
    else:
        ref_chosen_logps = ref_rejected_logps = chosen_scores = rejected_scores = None
        chosen_rewards = beta * policy_chosen_logps.detach()
        rejected_rewards = beta * policy_rejected_logps.detach()
    pairs = Pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_scores, rejected_scores, chosen_lengths, rejected_lengths)
    losses = sum(w * LOSS_TYPES[t](pairs, o) for t, w in o.terms)
    if o.use_weighting:  # WPO: the policy's own (length-normalised) probability of each pair, a constant
        losses = losses * torch.exp(chosen_wpo_logps.detach() + rejected_wpo_logps.detach())
    return losses, chosen_rewards, rejected_rewards


def dpo_head_outputs(options: DPOOptions, token_metrics: bool = True) -> tuple:
    """The `fa.linear_logps` outputs `linear_dpo_loss` asks for in its one fused pass. A precomputed reference
    scored with the same outputs (and batch) gets bitwise the log-probs the policy gets at step 0: on CUDA the
    statistics pass tiles the vocabulary differently from a logps-only pass."""
    return ("logps",) + (("entropy", "mean_logits", "is_top1") if token_metrics else ()) + (
        ("log_sum_sq_probs",) if options.use_weighting else ())


def _sequence_sums(token_values, targets, sequence_ids, num_sequences, ignore_index):
    """(per-sequence sums of token_values, completion-token counts), both (2B,) — padded or packed."""
    valid = targets != ignore_index
    if sequence_ids is None:  # padded: (2B, T)
        return token_values.sum(-1), valid.sum(-1)
    ids = sequence_ids.long()
    sums = segment_sum(token_values, ids, num_sequences)  # fixed order: no float atomics on CUDA
    counts = torch.zeros(num_sequences, dtype=torch.long, device=ids.device).index_add_(0, ids, valid.long())
    return sums, counts


def _check_every_sequence_has_completion(counts: torch.Tensor, ignore_index: int):
    if counts.is_cuda:  # device-side assert: no host sync
        device_assert((counts > 0).all(), "a sequence has no completion token (all targets ignore_index)")
        return
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"sequence {int(empty[0])} has no completion token (all its targets are "
                         f"ignore_index={ignore_index}); its log-prob would be an empty sum — drop the pair or fix "
                         f"its labels")


def linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    sequence_ids: Optional[torch.Tensor] = None,
    num_sequences: Optional[int] = None,
    bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    options: Optional[DPOOptions] = None,
    token_metrics: bool = True,
    ignore_index: int = -100,
    backend: str = "auto",
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    group=None,
    **loss_options,
):
    """Fused DPO from hidden states: `[chosen; rejected]` in one call, no (N, V) logits.

    Padded: hidden (2B, T, H), targets (2B, T), rows 0…B−1 chosen, B…2B−1 rejected, prompt and padding
    targets = ignore_index. Packed (padding-free): hidden (N, H), targets (N,), sequence_ids (N,) in
    [0, 2B) with chosen sequences first; pass `num_sequences=2B` to avoid a host sync reading it.
    Reference log-probs: precomputed `ref_chosen_logps`/`ref_rejected_logps` (B,), or `ref_hidden`
    (same layout, any H_ref) with `ref_weight` (V, H_ref), scored under no_grad with the fused path
    (optional for reference-free losses, `simpo` and `sft`: then they only set the rewards/* metrics).
    Loss options: one `DPOOptions` (`options=`) or its fields as keywords, as `dpo_loss` (TRL 1.16's names):
    `beta`, `loss_type` (one name or a list), `loss_weights`, `label_smoothing`, `f_divergence_type`,
    `f_alpha_divergence_coef`, `discopop_tau`, `use_weighting` (WPO: weights from the same fused pass's per-token
    log Σ_v p_v², no logits), `simpo_gamma` (alias `gamma`: SimPO's margin), `average_logps` (divide each sequence
    sum by its completion-token count; default on for simpo alone; precomputed reference log-probs must then be
    means too), `nll_coef` (RPO: adds `"sft"` with that weight). The head's options (`temperature`, `softcap`,
    `ignore_index`, `backend`, `chunk_bytes`, the shard) are those of `fa.linear_logps`.
    Returns (loss: 0-d, metrics: dict of detached 0-d tensors with TRL's names: rewards/{chosen, rejected,
    margins, accuracies}, logps/{chosen, rejected}, and with `token_metrics` (the fused pass's extra row
    statistics) entropy, logits/{chosen, rejected}, mean_token_accuracy; plus nll, the chosen token-mean NLL).
    Vocabulary-parallel heads (as `linear_logps`): a Shard(0) DTensor `weight` (and `ref_weight`), or a local
    shard with `vocab_start=, vocab_size=, group=` — then `ref_weight`, if given, is the same rows of the
    reference head.
    `token_metrics=False` skips those statistics (on CUDA the statistics pass tiles the vocabulary differently,
    so its log-probs equal a plain `linear_logps` call's to fp32 rounding, not bitwise — as in TRL, whose
    reference is scored without them).
    """
    o = resolve_options(DPOOptions, options, loss_options, caller="linear_dpo_loss")
    if sequence_ids is None:
        if hidden.dim() != 3 or targets.dim() != 2:
            raise ValueError(f"padded layout needs hidden (2B, T, H) and targets (2B, T), got "
                             f"{tuple(hidden.shape)} and {tuple(targets.shape)}; for packed input pass sequence_ids")
        n_seq = hidden.shape[0]
        if n_seq % 2:
            raise ValueError(f"hidden's first dimension must be even ([chosen; rejected]), got {n_seq}")
    else:
        if hidden.dim() != 2 or targets.dim() != 1 or tuple(sequence_ids.shape) != tuple(targets.shape):
            raise ValueError(f"packed layout needs hidden (N, H), targets (N,), sequence_ids (N,), got "
                             f"{tuple(hidden.shape)}, {tuple(targets.shape)}, {tuple(sequence_ids.shape)}")
        if sequence_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"sequence_ids must be int64 or int32, got {sequence_ids.dtype}")
        if num_sequences is None:
            num_sequences = (2 * ref_chosen_logps.shape[0] if ref_chosen_logps is not None
                             else int(sequence_ids.max()) + 1)  # host sync: pass num_sequences to avoid it
        n_seq = num_sequences
        if n_seq % 2:
            raise ValueError(f"num_sequences must be even ([chosen; rejected]), got {n_seq}")
        bad = (sequence_ids < 0) | (sequence_ids >= n_seq)
        if sequence_ids.is_cuda:
            device_assert(~bad.any(), "sequence_ids out of [0, num_sequences)")
        elif bool(bad.any()):
            raise ValueError(f"sequence_ids must lie in [0, {n_seq}) (2B sequences), found {int(sequence_ids[bad][0])}")
    B = n_seq // 2

    precomputed = ref_chosen_logps is not None or ref_rejected_logps is not None
    on_the_fly = ref_hidden is not None or ref_weight is not None
    needs_ref = o.needs_reference
    if precomputed and on_the_fly:
        raise ValueError("reference given twice: pass either ref_chosen_logps/ref_rejected_logps or "
                         "ref_hidden/ref_weight, not both")
    if needs_ref and not (precomputed or on_the_fly):
        raise ValueError(f"loss_type={list(o.loss_type)} needs a reference: pass ref_chosen_logps and ref_rejected_logps "
                         f"(B,), or ref_hidden and ref_weight")
    if precomputed and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps")
    if on_the_fly and (ref_hidden is None or ref_weight is None):
        raise ValueError("pass both ref_hidden and ref_weight")
    if precomputed:
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if tuple(t.shape) != (B,):
                raise ValueError(f"{name} must have shape (B,) = ({B},), got {tuple(t.shape)}")

    def score(h, w, b, outputs):  # the head's options, spelled once for the policy and the reference
        return linear_logps(h, w, targets, bias=b, temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                            outputs=outputs, backend=backend, chunk_bytes=chunk_bytes, vocab_start=vocab_start,
                            vocab_size=vocab_size, group=group)

    # One fused pass; the statistics are forward-only row reductions of the same logit tiles (no gradient).
    outputs = dpo_head_outputs(o, token_metrics)
    per_token = dict(zip(outputs, score(hidden, weight, bias, outputs)))
    token_logps = per_token["logps"]  # (2B, T) or (N,), 0 at ignored targets

    def per_sequence(values):  # (2B,) sums over each sequence's completion tokens
        return _sequence_sums(values, targets, sequence_ids, n_seq, ignore_index)[0]

    seq_logps, counts = _sequence_sums(token_logps, targets, sequence_ids, n_seq, ignore_index)
    _check_every_sequence_has_completion(counts, ignore_index)
    if o.per_token_means:
        seq_logps = seq_logps / counts
    if on_the_fly:
        if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
            raise ValueError(f"ref_hidden leading shape {tuple(ref_hidden.shape[:-1])} must equal hidden's "
                             f"{tuple(hidden.shape[:-1])}")
        with torch.no_grad():  # the fused no-grad path: nothing saved
            ref_seq = per_sequence(score(ref_hidden, ref_weight, ref_bias, ("logps",))[0])
            if o.per_token_means:
                ref_seq = ref_seq / counts
        ref_chosen_logps, ref_rejected_logps = ref_seq[:B], ref_seq[B:]
    wpo = {}
    if o.use_weighting:  # WPO, Eq. 2 of Zhou et al. 2024: mean over tokens of log p(y_t) − log Σ_v p_v², a constant
        aligned = per_sequence(token_logps.detach() - per_token["log_sum_sq_probs"]) / counts
        wpo = dict(chosen_wpo_logps=aligned[:B], rejected_wpo_logps=aligned[B:])

    chosen_logps, rejected_logps = seq_logps[:B], seq_logps[B:]
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, options=o, chosen_lengths=counts[:B],
        rejected_lengths=counts[B:], **wpo)
    loss = losses.mean()

    n_chosen = counts[:B].sum().clamp_min(1)
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
        "nll": -per_sequence(token_logps.detach())[:B].sum() / n_chosen,  # RPO's term, token mean over chosen
    }
    if token_metrics:  # TRL's token means: entropy over all completion tokens, the rest per side
        mean_logits = per_sequence(per_token["mean_logits"])
        metrics.update({
            "entropy": per_sequence(per_token["entropy"].detach()).sum() / counts.sum().clamp_min(1),
            "logits/chosen": mean_logits[:B].sum() / n_chosen,
            "logits/rejected": mean_logits[B:].sum() / counts[B:].sum().clamp_min(1),
            "mean_token_accuracy": per_sequence(per_token["is_top1"].float())[:B].sum() / n_chosen,
        })
    return loss, metrics
