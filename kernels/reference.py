"""Naive PyTorch references: the spec every fused op is tested and benchmarked against.

Each function here is written the obvious way, with the full `(N, V)` logits materialised.
They are slow and memory-hungry on purpose: nothing clever, so that nothing can be wrong.
Tests call them in float64 (`dtype=torch.float64`) on the *same* input values the fused op
sees (bf16 inputs are upcast exactly), so the only error left is the fused op's own.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Optional

import torch


def _accepts_options(fn):
    """Let a loss reference take `options=` (a `DPOOptions` / `PPOOptions`, read by field name: this module imports
    nothing above the kernels); its fields fill the keyword options not given explicitly. DPO's `simpo_gamma` is
    the references' `gamma`; RPO's `nll_coef` becomes an `sft` term where the reference has no `nll_coef`."""
    params = inspect.signature(fn).parameters
    open_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())

    @functools.wraps(fn)
    def wrapped(*args, options=None, **kw):
        if options is None:
            return fn(*args, **kw)
        fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
        if hasattr(options, "per_token_means"):  # DPO's average_logps, its default resolved
            fields["average_logps"] = options.per_token_means
        if "simpo_gamma" in fields:
            fields["gamma"] = fields.pop("simpo_gamma")
        if "nll_coef" in fields and "nll_coef" not in params:
            nll_coef = fields.pop("nll_coef")
            if nll_coef:
                types = [fields["loss_type"]] if isinstance(fields["loss_type"], str) else list(fields["loss_type"])
                weights = list(fields["loss_weights"] or [1.0] * len(types))
                fields["loss_type"], fields["loss_weights"] = types + ["sft"], weights + [nll_coef]
        for k, v in fields.items():
            if k in params or open_kw:
                kw.setdefault(k, v)
        return fn(*args, **kw)

    return wrapped


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
    # 0·log 0 = 0: a column at −inf in both heads (a −inf-masked padded vocabulary) adds nothing; the log-ratio
    # is zeroed before the product so that its NaN reaches neither the value nor the gradient.
    if direction == "forward":
        p = logp.exp()
        kl = (p * torch.where(p > 0, logp - logq, 0.0)).sum(-1)
    else:
        q = logq.exp()
        kl = (q * torch.where(q > 0, logq - logp, 0.0)).sum(-1)
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl


@_accepts_options
def dpo_loss_reference(pc, pr, rc, rr, *, beta=0.1, loss_type="sigmoid", loss_weights=None, label_smoothing=0.0,
                       gamma=0.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05,
                       chosen_lengths=None, rejected_lengths=None, average_logps=False, chosen_wpo_logps=None,
                       rejected_wpo_logps=None):
    """Reference DPO family on (B,) sequence log-probs, written pair by pair from each paper's own form —
    independently of the production table in `fusealign.losses.preference` (no logsigmoid, no shared
    helpers, the batch sorted with Python's `sorted`):

      ρ = log π(y) − log π_ref(y) (reference detached),  r = β ρ,  u = e^{ρ} = π/π_ref,
      s = f′-score of u: reverse KL log u · forward KL 1 − 1/u · JS log(2u/(1+u)) · α (u^{α−1} − 1)/(α − 1)
          (TRL's parametrisation; exponent capped at 80 as TRL; α = 1 is log u),  h = s_w − s_l
      sigmoid       Rafailov et al. 2023, Eq. 7: −log σ(β h),  −log σ(x) = log(1 + e^{−x})
      cdpo          Mitchell 2023: −(1−ε) log σ(β h) − ε log σ(−β h)
      robust        Chowdhury et al. 2024, Eq. 9: ((1−ε) L(y_w ≻ y_l) − ε L(y_l ≻ y_w)) / (1 − 2ε),  L = −log σ(·)
      hinge         SLiC-HF, Zhao et al. 2023: max(0, 1 − β h)
      ipo           Azar et al. 2023, Eq. 17, length-normalised (TRL): (s_w/n_w − s_l/n_l − 1/(2β))²
      ipo_sum       Eq. 17 on sums: (h − 1/(2β))²
      sigmoid_norm  −log σ(β (s_w/n_w − s_l/n_l))
      exo_pair      Ji et al. 2024, Eq. 16: Σ_{i∈{w,l}} q_i log(q_i / p_i),  q_w = σ(β h) = 1 − q_l,  p = (1−ε, ε)
      nca_pair      Chen et al. 2024: −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l)
      bco_pair      Jung et al. 2024: −log σ(r_w) − log σ(−r_l)
      sppo_hard     Wu et al. 2024: (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²
      apo_zero      D'Oosterlinck et al. 2024, Eq. 7: (1 − σ(r_w)) + σ(r_l)
      apo_down      Eq. 8: σ(r_w) + (1 − σ(r_w − r_l))
      discopop      Lu et al. 2024, Eq. 5: x = β h, m = σ(x/τ): (1 − m) log(1 + e^{−x}) + m e^{−x}
      simpo         Meng et al. 2024, Eq. 6 (inputs already length-normalised): smoothed −log σ(β (π_w − π_l) − γ)
      aot           Melnyk et al. 2024: k-th smallest of (π_w − π_l) minus k-th smallest of (ref_w − ref_l), δ_k;
                    smoothed −log σ(β δ_k)
      aot_unpaired  δ_k = k-th smallest ρ_w − k-th smallest ρ_l
      sft           −(Σ_b log π(y_w,b)) / (Σ_b n_w,b) in every entry (log-probs times n if they are means)
    A list of types is summed with `loss_weights`; WPO (`chosen_wpo_logps`/`rejected_wpo_logps` given) multiplies
    pair b by e^{a_w,b} e^{a_l,b} (constants). Returns (B,) losses in the inputs' dtype; differentiable in pc and pr.
    """
    eps, B = label_smoothing, pc.shape[0]
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)

    def softplus(x):  # log(1 + e^x), stable for either sign of x
        return torch.log1p(torch.exp(-torch.abs(x))) + torch.clamp(x, min=0)

    def nls(x):  # −log σ(x)
        return softplus(-x)

    def sig(x):
        return 1 / (1 + torch.exp(-x))

    def smoothed(x):
        return (1 - eps) * nls(x) + eps * nls(-x)

    def f_score(rho):
        if f_divergence_type == "reverse_kl" or (f_divergence_type == "alpha_divergence"
                                                 and abs(f_alpha_divergence_coef - 1) < 1e-6):
            return rho
        if f_divergence_type == "forward_kl":
            return 1 - 1 / torch.exp(rho)
        if f_divergence_type == "js_divergence":
            u = torch.exp(rho)
            return torch.log(2 * u / (1 + u))
        a = f_alpha_divergence_coef
        return (torch.exp(torch.clamp((a - 1) * rho, max=80.0)) - 1) / (a - 1)

    def kth_smallest(values, k):
        return values[sorted(range(B), key=lambda i: values[i].item())[k]]

    out = []
    for b in range(B):
        total = 0.0
        for t, w in zip(types, weights):
            if t == "simpo":
                value = smoothed(beta * (pc[b] - pr[b]) - gamma)
            elif t == "sft":
                n = chosen_lengths.to(pc.dtype)
                value = -sum(pc[i] * (n[i] if average_logps else 1) for i in range(B)) / n.sum()
            else:
                rho_w, rho_l = pc[b] - rc[b].detach(), pr[b] - rr[b].detach()
                r_w, r_l = beta * rho_w, beta * rho_l
                s_w, s_l = f_score(rho_w), f_score(rho_l)
                h = s_w - s_l
                if t in ("ipo", "sigmoid_norm"):
                    n_w = max(int(chosen_lengths[b]), 1)
                    n_l = max(int(rejected_lengths[b]), 1)
                    h_norm = s_w / n_w - s_l / n_l
                if t == "sigmoid":
                    value = nls(beta * h)
                elif t == "cdpo":
                    value = smoothed(beta * h)
                elif t == "robust":
                    value = ((1 - eps) * nls(beta * h) - eps * nls(-beta * h)) / (1 - 2 * eps)
                elif t == "hinge":
                    value = torch.clamp(1 - beta * h, min=0)
                elif t == "ipo":
                    value = (h_norm - 1 / (2 * beta)) ** 2
                elif t == "ipo_sum":
                    value = (h - 1 / (2 * beta)) ** 2
                elif t == "sigmoid_norm":
                    value = nls(beta * h_norm)
                elif t == "exo_pair":
                    q_w, q_l = sig(beta * h), sig(-beta * h)
                    value = q_w * torch.log(q_w / (1 - eps)) + q_l * torch.log(q_l / eps)
                elif t == "nca_pair":
                    value = nls(r_w) + 0.5 * nls(-r_w) + 0.5 * nls(-r_l)
                elif t == "bco_pair":
                    value = nls(r_w) + nls(-r_l)
                elif t == "sppo_hard":
                    value = (rho_w - 1 / (2 * beta)) ** 2 + (rho_l + 1 / (2 * beta)) ** 2
                elif t == "apo_zero":
                    value = (1 - sig(r_w)) + sig(r_l)
                elif t == "apo_down":
                    value = sig(r_w) + (1 - sig(r_w - r_l))
                elif t == "discopop":
                    x = beta * h
                    m = sig(x / discopop_tau)
                    value = (1 - m) * nls(x) + m * torch.exp(-x)
                elif t == "aot":
                    margins = [pc[i] - pr[i] for i in range(B)]
                    ref_margins = [(rc[i] - rr[i]).detach() for i in range(B)]
                    value = smoothed(beta * (kth_smallest(margins, b) - kth_smallest(ref_margins, b)))
                elif t == "aot_unpaired":
                    rho_ws = [pc[i] - rc[i].detach() for i in range(B)]
                    rho_ls = [pr[i] - rr[i].detach() for i in range(B)]
                    value = smoothed(beta * (kth_smallest(rho_ws, b) - kth_smallest(rho_ls, b)))
                else:
                    raise ValueError(t)
            total = total + w * value
        if chosen_wpo_logps is not None:
            total = total * torch.exp(chosen_wpo_logps[b].detach()) * torch.exp(rejected_wpo_logps[b].detach())
        out.append(total)
    return torch.stack(out)


@_accepts_options
def linear_dpo_loss_reference(hidden, weight, targets, *, ref_chosen_logps=None, ref_rejected_logps=None,
                              ref_hidden=None, ref_weight=None, beta=0.1, loss_type="sigmoid",
                              label_smoothing=0.0, average_logps=False, nll_coef=0.0, ignore_index=-100,
                              use_weighting=False, dtype=torch.float64, **loss_options):
    """Reference fused DPO on the padded layout hidden (2B, T, H): materialised logits, plain sums; the
    other `loss_options` (loss_weights, gamma, f_divergence_type, …) go to `dpo_loss_reference`."""
    n = (targets != ignore_index).sum(-1)

    def seq_logps(h, w):
        lp, lssp = linear_logps_reference(h, w, targets, ignore_index=ignore_index, dtype=dtype,
                                          outputs=("logps", "log_sum_sq_probs"))  # (2B, T) each
        s = lp.sum(-1)
        return (s / n if average_logps else s), lp, lssp

    pol, tok, lssp = seq_logps(hidden, weight)
    B = hidden.shape[0] // 2
    if ref_hidden is not None:
        ref, _, _ = seq_logps(ref_hidden, ref_weight)
        ref_chosen_logps, ref_rejected_logps = ref[:B].detach(), ref[B:].detach()
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = loss_options.pop("loss_weights", None) or [1.0] * len(types)
    if nll_coef:
        types, weights = types + ["sft"], list(weights) + [nll_coef]
    wpo = {}
    if use_weighting:  # WPO: e^{mean over completion tokens of (log p − log Σ p²)}, a constant
        a = ((tok - lssp).detach().sum(-1) / n)
        wpo = dict(chosen_wpo_logps=a[:B], rejected_wpo_logps=a[B:])
    losses = dpo_loss_reference(pol[:B], pol[B:], ref_chosen_logps, ref_rejected_logps, beta=beta,
                                loss_type=types, loss_weights=weights, label_smoothing=label_smoothing,
                                chosen_lengths=n[:B], rejected_lengths=n[B:], average_logps=average_logps,
                                **wpo, **loss_options)
    return losses.mean()


def sequence_rewards_reference(hidden, value_weight, mask, value_bias=None):
    """Loop over rows: the reward of row b is value_weight · hidden[b, last index where mask is 1]."""
    out = []
    for b in range(hidden.shape[0]):
        last = max(i for i in range(hidden.shape[1]) if mask[b, i])
        r = hidden[b, last] @ value_weight.reshape(-1)
        out.append(r + (value_bias.reshape(()) if value_bias is not None else 0))
    return torch.stack(out)


@_accepts_options
def ppo_policy_loss_reference(logps, entropy, old_logps, advantages, mask, *, ref_logps=None, clip_eps=0.2,
                              clip_eps_high=None, dual_clip=None, kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0,
                              loss_agg="token-mean", sampling_logps=None, vllm_importance_sampling_correction=True,
                              vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_min=None,
                              vllm_importance_sampling_clip_max=3.0):
    """Reference PPO/GRPO clipped loss on per-token log-probs (B, T), written token by token; with `sampling_logps`
    the policy term times the sampler-mismatch ratio (TRL 1.16's definitions, one Python float per token)."""
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
    if sampling_logps is not None and vllm_importance_sampling_correction:
        rows = (lambda x: x) if logps.dim() == 2 else (lambda x: x[None])  # (N,) tokens: one row (token modes)
        old2, smp2, m2 = rows(old_logps), rows(sampling_logps), rows(mask)
        lo, hi = vllm_importance_sampling_clip_min, vllm_importance_sampling_clip_max
        r = torch.ones(old2.shape, dtype=dtype)
        for i in range(old2.shape[0]):
            logs = [float(old2[i, t] - smp2[i, t]) if m2[i, t] else 0.0 for t in range(old2.shape[1])]
            logs = [0.0 if math.isnan(x) else x for x in logs]  # a NaN sampler log-prob: no correction
            if vllm_importance_sampling_mode.startswith("sequence"):
                logs = [sum(logs)] * len(logs)
            for t, lr in enumerate(logs):
                x = math.exp(lr)
                if vllm_importance_sampling_mode.endswith("truncate"):
                    x = min(x, hi) if hi is not None else x
                    x = max(x, lo) if lo is not None else x
                elif (lo is not None and x < lo) or (hi is not None and x > hi):
                    x = 0.0
                r[i, t] = x
        loss = loss * r.view(loss.shape).to(loss.device)
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


@_accepts_options
def ppo_loss_reference(hidden, weight, targets, old_logps, advantages, *, temperature=1.0, ignore_index=-100,
                       dtype=torch.float64, **loss_options):
    """Reference fused PPO/GRPO loss on (B, T) tokens: materialised logits, then the token-by-token loss."""
    logps, entropy = linear_logps_reference(hidden, weight, targets, temperature=temperature,
                                            ignore_index=ignore_index, return_entropy=True, dtype=dtype)
    return ppo_policy_loss_reference(logps, entropy, old_logps, advantages, targets != ignore_index, **loss_options)


def _val(x) -> float:
    """A scalar's value (no autograd warning for a tensor that requires grad)."""
    return x.detach().item() if isinstance(x, torch.Tensor) else float(x)


def grpo_loss_reference(logps, old_logps, advantages, mask, *, ref_logps=None, sampling_logps=None, entropy=None,
                        num_items_in_batch=None, loss_type="dapo", epsilon=0.2, epsilon_high=None, delta=None,
                        importance_sampling_level="token", beta=0.0, use_bias_correction_kl=True,
                        max_completion_length=None, sapo_temperature_neg=1.05, sapo_temperature_pos=1.0,
                        vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
                        top_entropy_quantile=1.0, entropy_coef=0.0, off_policy_mask_threshold=None,
                        vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="sequence_mask",
                        vllm_importance_sampling_clip_min=None, vllm_importance_sampling_clip_max=3.0,
                        gradient_accumulation_steps=1, steps_per_generation=None, num_processes=1):
    """Reference for `fusealign.grpo_loss` (TRL 1.16's GRPO family), sequence by sequence, token by token.

    Same arguments and option names (plain keywords here; (B, T) tensors, advantages (B,) or (B, T)). Written
    the obvious way with Python loops over scalars (for B·T of a few dozen); the formulas are those of
    `fusealign.losses.grpo`'s docstring. Returns (loss: 0-d, metrics: dict of Python floats, TRL's names).
    """
    B, T = logps.shape
    dt = logps.dtype
    m = mask.bool()
    n = [int(m[i].sum()) for i in range(B)]
    A = advantages.to(dt) if advantages.dim() == 2 else advantages.to(dt)[:, None].expand(B, T)
    old = logps.detach() if old_logps is None else old_logps.detach().to(dt)
    eps_h = epsilon if epsilon_high is None else epsilon_high
    tokens = [(i, t) for i in range(B) for t in range(T) if m[i, t]]
    one = torch.ones((), dtype=dt)
    per_seq_w = importance_sampling_level == "sequence"
    per_seq_metric = per_seq_w and advantages.dim() == 1  # TRL's (B, 1) tensors: a plain mean over sequences

    # the sampler-mismatch ratio r[i][t] (a constant), TRL's generation-time correction
    vllm = sampling_logps is not None and vllm_importance_sampling_correction
    r = [[one] * T for _ in range(B)]
    metrics = {}
    if vllm:
        def log_r(i, t):
            d = _val(old[i, t] - sampling_logps[i, t]) if m[i, t] else 0.0
            return 0.0 if math.isnan(d) else d
        lo, hi = vllm_importance_sampling_clip_min, vllm_importance_sampling_clip_max
        seq_mode = vllm_importance_sampling_mode.startswith("sequence")
        raw = [[math.exp(sum(log_r(i, t) for t in range(T)))] * T if seq_mode else
               [math.exp(log_r(i, t)) for t in range(T)] for i in range(B)]
        for i in range(B):
            for t in range(T):
                x = raw[i][t]
                if vllm_importance_sampling_mode.endswith("truncate"):
                    x = min(x, hi) if hi is not None else x
                    x = max(x, lo) if lo is not None else x
                elif (lo is not None and x < lo) or (hi is not None and x > hi):
                    x = 0.0
                r[i][t] = torch.tensor(x, dtype=dt)
        diffs = [abs(_val(old[i, t] - sampling_logps[i, t])) for i, t in tokens]
        diffs = [d for d in diffs if not math.isnan(d)]
        ratios = [_val(r[i][0]) for i in range(B)] if seq_mode else [_val(r[i][t]) for i, t in tokens]
        metrics.update({"sampling/sampling_logp_difference/mean": sum(diffs) / len(diffs) if diffs else 0.0,
                        "sampling/sampling_logp_difference/max": max(diffs, default=0.0),
                        "sampling/importance_sampling_ratio/min": min(ratios, default=0.0),
                        "sampling/importance_sampling_ratio/mean": sum(ratios) / len(ratios) if ratios else 0.0,
                        "sampling/importance_sampling_ratio/max": max(ratios, default=0.0)})

    # importance weights w[i][t]: per token, or GSPO's exp(mean log-ratio) for the whole sequence
    if per_seq_w:
        s = [sum((logps[i, t] - old[i, t] for t in range(T) if m[i, t]), torch.zeros((), dtype=dt)) / max(n[i], 1)
             for i in range(B)]
        w = [[torch.exp(s[i])] * T for i in range(B)]
    else:
        w = [[torch.exp(logps[i, t] - old[i, t]) if m[i, t] else one for t in range(T)] for i in range(B)]

    keep_entropy = None
    if top_entropy_quantile < 1.0:
        valid = torch.stack([entropy[i, t].detach() for i, t in tokens]) if tokens else None
        thr = torch.quantile(valid, 1.0 - top_entropy_quantile).item() if tokens else math.inf
        keep_entropy = [[bool(m[i, t]) and entropy[i, t].item() >= thr for t in range(T)] for i in range(B)]
    keep_off_policy = None
    if off_policy_mask_threshold is not None:
        ref_sampler = old if sampling_logps is None else sampling_logps
        kl_i = []
        for i in range(B):
            d = [_val(ref_sampler[i, t] - logps[i, t]) for t in range(T) if m[i, t]]
            kl_i.append(sum(0.0 if math.isnan(x) else x for x in d) / max(n[i], 1))
        keep_off_policy = [[_val(A[i, t]) >= 0 or kl_i[i] <= off_policy_mask_threshold for t in range(T)]
                           for i in range(B)]

    # VESPO's Gamma weight φ of the sequence's whole ratio (with the vLLM ratios), a constant
    phi = None
    if loss_type == "vespo":
        phi = [[0.0] * T for _ in range(B)]
        for i in range(B):
            lw = sum(min(max(_val(logps[i, t] - old[i, t]), -20.0), 20.0) for t in range(T) if m[i, t])
            if vllm:
                lw += sum(min(max(math.log(_val(r[i][t])) if _val(r[i][t]) > 0 else -math.inf,
                                  math.log(1e-8)), 20.0) for t in range(T))
            lw = min(max(lw, math.log(1e-8)), 20.0)
            for t in range(T):
                pos = _val(A[i, t]) >= 0
                k = vespo_k_pos if pos else vespo_k_neg
                lam = max(vespo_lambda_pos if pos else vespo_lambda_neg, 1e-4)
                v = math.exp(lam + k * lw - lam * math.exp(lw))
                phi[i][t] = v if math.isfinite(v) else 0.0

    def policy_term(i, t):
        a, wt, lp = A[i, t], w[i][t], logps[i, t]
        if loss_type == "cispo":
            return -torch.clamp(wt, max=eps_h).detach() * a * lp
        if loss_type == "sapo":
            tau = sapo_temperature_pos if a > 0 else sapo_temperature_neg
            return -torch.sigmoid(tau * (wt - 1)) * 4 / tau * a
        if loss_type == "vespo":
            return -phi[i][t] * a * lp
        capped = wt if delta is None else torch.clamp(wt, max=delta)
        return -torch.min(capped * a, torch.clamp(wt, 1 - epsilon, 1 + eps_h) * a)

    def kl_term(i, t):
        d = ref_logps[i, t].to(dt) - logps[i, t]
        kl = torch.exp(d) - d - 1
        return kl * w[i][t] if use_bias_correction_kl else kl

    loss_it = {}
    for i, t in tokens:
        x = policy_term(i, t)
        if keep_off_policy is not None and not keep_off_policy[i][t]:
            x = x * 0
        if keep_entropy is not None and not keep_entropy[i][t]:
            x = x * 0
        if vllm and loss_type != "vespo":
            x = x * r[i][t]
        if beta != 0.0:
            x = x + beta * kl_term(i, t)
        loss_it[i, t] = x
    zero = torch.zeros((), dtype=dt)
    seq_sum = [sum((loss_it[i, t] for t in range(T) if m[i, t]), zero) for i in range(B)]
    total = sum(seq_sum, zero)
    GA = gradient_accumulation_steps
    if loss_type in ("grpo", "sapo"):
        policy = sum((seq_sum[i] / max(n[i], 1) for i in range(B)), zero) / B
    elif loss_type == "bnpo":
        policy = total / max(sum(n), 1)
    elif loss_type == "dr_grpo":
        policy = total / (B * max_completion_length)
    elif loss_type == "luspo":
        policy = total / B
    else:  # dapo, cispo, vespo: TRL's num_items_in_batch over the generation batch and the ranks
        items = sum(n) if num_items_in_batch is None else float(num_items_in_batch)
        spg = GA if steps_per_generation is None else steps_per_generation
        policy = total / (max(items, 1.0) / num_processes * GA / spg)
    loss = policy if loss_type in ("dapo", "cispo", "vespo") else policy / GA
    if entropy_coef != 0.0:
        bonus_tokens = [(i, t) for i, t in tokens if keep_entropy is None or keep_entropy[i][t]]
        mean_h = sum((entropy[i, t] for i, t in bonus_tokens), zero) / max(len(bonus_tokens), 1)
        loss = loss - entropy_coef * mean_h / GA

    def mean_over(f):  # TRL's global_masked_mean
        if per_seq_metric:
            return sum(f(i, 0) for i in range(B)) / B
        return sum(f(i, t) for i, t in tokens) / max(len(tokens), 1)

    if beta != 0.0:  # the KL is per token at either level
        metrics["kl"] = sum(kl_term(i, t).item() for i, t in tokens) / max(len(tokens), 1)
    if entropy is not None:
        metrics["entropy"] = sum(entropy[i, t].item() for i, t in tokens) / max(len(tokens), 1)
    metrics["policy_loss"] = policy.item()
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        def capped(i, t):
            return _val(w[i][t]) if delta is None else min(_val(w[i][t]), delta)
        low = lambda i, t: _val(capped(i, t) < 1 - epsilon and _val(A[i, t]) < 0)  # noqa: E731
        high = lambda i, t: _val(capped(i, t) > 1 + eps_h and _val(A[i, t]) > 0)  # noqa: E731
        metrics["clip_ratio/low_mean"] = mean_over(low)
        metrics["clip_ratio/high_mean"] = mean_over(high)
        metrics["clip_ratio/region_mean"] = mean_over(lambda i, t: max(low(i, t), high(i, t)))

        def per_sequence(f):  # TRL's masked_seq_mean: empty sequences are NaN, left out of nanmin / nanmax
            if per_seq_metric:
                return [f(i, 0) for i in range(B)]
            return [sum(f(i, t) for t in range(T) if m[i, t]) / n[i] for i in range(B) if n[i]]
        metrics["clip_ratio/low_min"] = min(per_sequence(low), default=math.nan)
        metrics["clip_ratio/high_max"] = max(per_sequence(high), default=math.nan)
    elif loss_type == "cispo":
        metrics["cispo_clip_ratio"] = mean_over(lambda i, t: _val(_val(w[i][t]) > eps_h and _val(A[i, t]) > 0))
    elif loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = sum(phi[i][0] for i in range(B)) / B if advantages.dim() == 1 else \
            sum(phi[i][t] for i, t in tokens) / max(len(tokens), 1)
    if entropy_coef != 0.0:
        metrics["entropy_coef"] = float(entropy_coef)
    return loss, metrics


def linear_grpo_loss_reference(hidden, weight, targets, old_logps, advantages, *, bias=None, temperature=1.0,
                               softcap=None, ignore_index=-100, dtype=torch.float64, **options):
    """Reference fused GRPO-family loss: materialised logits → log-probs and entropy → `grpo_loss_reference`."""
    logps, entropy = linear_logps_reference(hidden, weight, targets, bias=bias, temperature=temperature,
                                            softcap=softcap, ignore_index=ignore_index, return_entropy=True,
                                            dtype=dtype)
    return grpo_loss_reference(logps, old_logps, advantages, targets != ignore_index, entropy=entropy, **options)
