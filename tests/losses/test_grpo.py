"""`fa.grpo_loss` / `fa.linear_grpo_loss` (TRL 1.16's GRPO family): hand-computed cases, the float64 reference,
gradient checks, the fused twin on both backends, and the errors bad options get.

(Parity with TRL's own trainer code: tests/losses/test_grpo_trl_parity.py.)
"""

import dataclasses
import math

import pytest
import torch
from helpers import BACKENDS, device_for, leaf64, rel_err

import fusealign as fa
from fusealign.kernels.reference import grpo_loss_reference, linear_grpo_loss_reference, linear_logps_reference
from fusealign.losses.grpo import LOSS_TYPES, VLLM_IS_MODES

D = torch.float64


# --- hand-computed cases ------------------------------------------------------------------------------------
def tiny(ratios=((1.5, 0.9), (0.5, 1.0)), logps=((-1.0, -2.0), (-0.5, 0.0))):
    """B = 2, T = 2, mask [[1, 1], [1, 0]], A = (1, −1); old log-probs set so that w = e^{ℓ − ℓ_old} = `ratios`."""
    lp = torch.tensor(logps, dtype=D, requires_grad=True)
    old = lp.detach() - torch.tensor(ratios, dtype=D).log()
    mask = torch.tensor([[True, True], [True, False]])
    return lp, old, torch.tensor([1.0, -1.0], dtype=D), mask


def test_clipped_family_by_hand():
    """ε = 0.2 clips w to [0.8, 1.2]; per token −min(w·A, clip(w)·A):
        (0,0) A = 1, w = 1.5 → −min(1.5, 1.2) = −1.2      (0,1) A = 1, w = 0.9 → −0.9
        (1,0) A = −1, w = 0.5 → −min(−0.5, −0.8) = 0.8     Σ = −1.3 over 3 tokens
    grpo:    mean of per-sequence means = ((−1.2 − 0.9)/2 + 0.8/1) / 2 = (−1.05 + 0.8)/2 = −0.125
    bnpo:    −1.3 / 3 = −0.433333…                 dr_grpo (L = 4):  −1.3 / (2 · 4) = −0.1625
    dapo:    −1.3 / 3 (num_items = this batch's 3)  luspo: mean of per-sequence sums = (−2.1 + 0.8)/2 = −0.65
    dapo, num_items_in_batch = 10, GA = 2, steps_per_generation = 4: divisor 10 · 2/4 = 5 → −0.26
    clip_ratio: low = {(1,0)} (w < 0.8, A < 0), high = {(0,0)} (w > 1.2, A > 0): low_mean = high_mean = 1/3,
    region_mean = 2/3; per sequence low = (0, 1) → low_min = 0, high = (1/2, 0) → high_max = 0.5.
    The gradient: clipped tokens get none; (0,1): ∂/∂ℓ (−w·A) = −w = −0.9, over 2 tokens and 2 sequences (grpo)."""
    expect = {"grpo": -0.125, "bnpo": -1.3 / 3, "dr_grpo": -0.1625, "dapo": -1.3 / 3, "luspo": -0.65}
    for loss_type, value in expect.items():
        lp, old, A, mask = tiny()
        loss, m = fa.grpo_loss(lp, old, A, mask, loss_type=loss_type, max_completion_length=4)
        assert loss.item() == pytest.approx(value, abs=1e-12), loss_type
        assert m["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)
        assert m["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
        assert m["clip_ratio/region_mean"].item() == pytest.approx(2 / 3)
        assert m["clip_ratio/low_min"].item() == 0.0 and m["clip_ratio/high_max"].item() == 0.5
        if loss_type == "grpo":
            loss.backward()
            assert torch.allclose(lp.grad, torch.tensor([[0.0, -0.9 / 4], [0.0, 0.0]], dtype=D), atol=1e-12)
    lp, old, A, mask = tiny()
    loss, _ = fa.grpo_loss(lp, old, A, mask, num_items_in_batch=10, gradient_accumulation_steps=2,
                           steps_per_generation=4)
    assert loss.item() == pytest.approx(-0.26, abs=1e-12)


def test_clip_higher_and_two_sided_by_hand():
    """ε_h = 0.6: (0,0) w = 1.5 < 1.6 is no longer clipped → −1.5; Σ = −1.5 − 0.9 + 0.8 = −1.6, dapo −1.6/3.
    δ = 1.3 (two-sided): the unclipped branch is min(w, δ) = 1.3 at (0,0): −min(1.3, 1.2) = −1.2 (unchanged); with
    ε_h = 0.6 as well: −min(1.3, 1.5) = −1.3 → Σ = −1.4, dapo −1.4/3; TRL counts clipping on the capped w: 1.3 <
    1.6, so high_mean = 0."""
    lp, old, A, mask = tiny()
    assert fa.grpo_loss(lp, old, A, mask, epsilon_high=0.6)[0].item() == pytest.approx(-1.6 / 3, abs=1e-12)
    assert fa.grpo_loss(lp, old, A, mask, delta=1.3)[0].item() == pytest.approx(-1.3 / 3, abs=1e-12)
    loss, m = fa.grpo_loss(lp, old, A, mask, delta=1.3, epsilon_high=0.6)
    assert loss.item() == pytest.approx(-1.4 / 3, abs=1e-12) and m["clip_ratio/high_mean"].item() == 0.0


def test_gspo_by_hand():
    """GSPO (importance_sampling_level="sequence", loss_type="grpo"): w_i = exp(mean log-ratio of sequence i):
        w_0 = exp((ln 1.5 + ln 0.9)/2) = √1.35 = 1.161895…  (inside [0.8, 1.2]: not clipped)
        w_1 = 0.5 → clipped to 0.8 with A = −1: −min(−0.5, −0.8) = 0.8
    loss = ((−w_0 − w_0)/2 + 0.8)/2 = (0.8 − 1.161895)/2 = −0.180948; ∂/∂ℓ_0t = ½ · (−w_0 · ½) = −w_0/4 = −0.290474
    on both tokens of sequence 0 (the sequence weight's gradient reaches every token), 0 on the clipped sequence."""
    lp, old, A, mask = tiny()
    loss, m = fa.grpo_loss(lp, old, A, mask, loss_type="grpo", importance_sampling_level="sequence")
    w0 = math.sqrt(1.35)
    assert loss.item() == pytest.approx((0.8 - w0) / 2, abs=1e-12)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-w0 / 4, -w0 / 4], [0.0, 0.0]], dtype=D), atol=1e-12)
    # per-sequence metrics are plain means over the B sequences (TRL's (B, 1) rule): sequence 1 is low-clipped
    assert m["clip_ratio/low_mean"].item() == 0.5 and m["clip_ratio/high_mean"].item() == 0.0


def test_cispo_by_hand():
    """cispo with ε_h = 1.2 (its cap on w itself): sg(min(w, 1.2)) = (1.2, 0.9; 0.5); per token −cap·A·ℓ with
    ℓ = (−1, −2; −0.5):  (0,0) −1.2·1·(−1) = 1.2,  (0,1) −0.9·(−2) = 1.8,  (1,0) −0.5·(−1)·(−0.5) = −0.25;
    dapo's normaliser: (1.2 + 1.8 − 0.25)/3 = 2.75/3 = 0.916667; ∂/∂ℓ = −cap·A/3 = (−0.4, −0.3; 0.5/3); clipped:
    w > 1.2 with A > 0 at (0,0): cispo_clip_ratio = 1/3."""
    lp, old, A, mask = tiny()
    loss, m = fa.grpo_loss(lp, old, A, mask, loss_type="cispo", epsilon_high=1.2)
    assert loss.item() == pytest.approx(2.75 / 3, abs=1e-12)
    assert m["cispo_clip_ratio"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-0.4, -0.3], [0.5 / 3, 0.0]], dtype=D), atol=1e-12)


def test_sapo_and_vespo_by_hand():
    """SAPO on-policy (w = 1): −(4/τ) σ(0) A = −2A/τ per token; τ = 1 for A > 0, 1.05 for A ≤ 0:
        grpo-style mean = ((−2 − 2)/2 + 2/1.05)/2 = (−2 + 1.904762)/2 = −0.047619; the gate's slope at w = 1 is 1,
        so ∂/∂ℓ_0t = −1 · ½ · ½ = −0.25 (REINFORCE's).
    VESPO: W_0 = 1.5 · 0.9 = 1.35 (A ≥ 0: k = 2, λ = 3): φ_0 = exp(3 + 2 ln 1.35 − 3·1.35) = 0.637762;
        W_1 = 0.5 (A < 0: k = 3, λ = 2): φ_1 = exp(2 + 3 ln 0.5 − 1) = e/8 = 0.339785;
        per token −φ A ℓ: 0.637762, 1.275523, −0.169893 → Σ/3 = 0.581131; ∂/∂ℓ = −φ A / 3 (φ is a constant)."""
    lp, old, A, mask = tiny(ratios=((1.0, 1.0), (1.0, 1.0)))
    loss, _ = fa.grpo_loss(lp, old, A, mask, loss_type="sapo")
    assert loss.item() == pytest.approx((-2 + 2 / 1.05) / 2, abs=1e-12)
    loss.backward()
    assert torch.allclose(lp.grad[0], torch.full((2,), -0.25, dtype=D), atol=1e-12)
    lp, old, A, mask = tiny()
    loss, m = fa.grpo_loss(lp, old, A, mask, loss_type="vespo")
    phi0, phi1 = math.exp(3 + 2 * math.log(1.35) - 3 * 1.35), math.e / 8
    assert loss.item() == pytest.approx((phi0 * 1 + phi0 * 2 - phi1 * 0.5) / 3, abs=1e-12)
    assert m["vespo/phi_seq_mean"].item() == pytest.approx((phi0 + phi1) / 2, abs=1e-12)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-phi0 / 3, -phi0 / 3], [phi1 / 3, 0.0]], dtype=D), atol=1e-12)


def test_kl_and_vllm_correction_by_hand():
    """On-policy, A = 0 (no policy term), β = 0.1, ref − ℓ = ln 2 on every token: k3 = 2 − ln 2 − 1 = 0.306853,
    loss = β·k3 (a token mean) = 0.0306853, kl = 0.306853. The vLLM ratio π_old/π_sampler with ℓ_sampler = ℓ_old
    − ln 4 on token (0,0): token_truncate clamps 4 to C_max = 3, token_mask zeroes it (C_max = 3), each other
    token has ratio 1; sequence_mask multiplies over the sequence (4 > 3: sequence 0 zeroed)."""
    lp, old, _, mask = tiny(ratios=((1.0, 1.0), (1.0, 1.0)))
    A0 = torch.zeros(2, dtype=D)
    ref = lp.detach() + math.log(2)
    loss, m = fa.grpo_loss(lp, old, A0, mask, beta=0.1, ref_logps=ref)
    assert loss.item() == pytest.approx(0.1 * (1 - math.log(2)), abs=1e-12)
    assert m["kl"].item() == pytest.approx(1 - math.log(2), abs=1e-12)
    sampling = old.clone()
    sampling[0, 0] -= math.log(4)
    A = torch.ones(2, dtype=D)
    for mode, first in (("token_truncate", 3.0), ("token_mask", 0.0), ("sequence_mask", 0.0)):
        loss, m = fa.grpo_loss(lp, old, A, mask, sampling_logps=sampling, vllm_importance_sampling_mode=mode)
        # on-policy: per token −A·1 · r^IS; dapo: Σ/3
        others = (-1.0 + (0.0 if mode == "sequence_mask" else -1.0))
        assert loss.item() == pytest.approx((-first + others) / 3, abs=1e-12), mode
        assert m["sampling/sampling_logp_difference/max"].item() == pytest.approx(math.log(4))
        assert m["sampling/sampling_logp_difference/mean"].item() == pytest.approx(math.log(4) / 3)


# --- against the float64 reference -------------------------------------------------------------------------------
def batch(B=4, T=6, seed=0, per_token_advantages=False):
    """Right-padded completions of lengths (6, 3, 0, 5) (one empty), off-policy ratios, a reference, the
    sampler's log-probs (one NaN, as vLLM reports an unscorable token), entropies."""
    g = torch.Generator().manual_seed(seed)
    lengths = [6, 3, 0, 5][:B]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    lp = (-torch.rand(B, T, generator=g, dtype=D) * 3).masked_fill(~mask, 0)
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=D)).masked_fill(~mask, 0)
    ref = (lp + 0.5 * torch.randn(B, T, generator=g, dtype=D)).masked_fill(~mask, 0)
    sampling = (old + 0.4 * torch.randn(B, T, generator=g, dtype=D)).masked_fill(~mask, 0)
    sampling[0, 1] = math.nan
    entropy = (torch.rand(B, T, generator=g, dtype=D) * 4).masked_fill(~mask, 0)
    A = torch.randn(B, T, generator=g, dtype=D) if per_token_advantages else torch.tensor([1.2, -0.7, 0.3, -1.1],
                                                                                            dtype=D)[:B]
    return dict(logps=lp, old_logps=old, advantages=A, mask=mask, ref_logps=ref, sampling_logps=sampling,
                entropy=entropy)


CASES = []
for _lt in LOSS_TYPES:
    for _level in ("token", "sequence"):
        CASES.append(dict(loss_type=_lt, importance_sampling_level=_level))
        CASES.append(dict(loss_type=_lt, importance_sampling_level=_level, beta=0.04, epsilon_high=0.28))
    for _mode in VLLM_IS_MODES:
        if not (_lt == "vespo" and _mode.startswith("sequence")):
            CASES.append(dict(loss_type=_lt, vllm_importance_sampling_mode=_mode, vllm_importance_sampling_clip_min=0.6,
                              vllm_importance_sampling_clip_max=1.4, _vllm=True))
CASES += [
    dict(loss_type="grpo", delta=1.1, beta=0.1, use_bias_correction_kl=False),
    dict(loss_type="dapo", top_entropy_quantile=0.4, entropy_coef=0.03),
    dict(loss_type="grpo", importance_sampling_level="sequence", top_entropy_quantile=0.0, entropy_coef=-0.02),
    dict(loss_type="bnpo", off_policy_mask_threshold=0.05),
    dict(loss_type="dapo", off_policy_mask_threshold=0.0, _vllm=True, vllm_importance_sampling_mode="token_mask"),
    dict(loss_type="dapo", num_items_in_batch=40, gradient_accumulation_steps=4, steps_per_generation=2,
         num_processes=2),
    dict(loss_type="cispo", epsilon_high=1.1, num_items_in_batch=7),
    dict(loss_type="sapo", sapo_temperature_pos=0.3, sapo_temperature_neg=3.0, gradient_accumulation_steps=2),
    dict(loss_type="vespo", vespo_k_pos=0.5, vespo_lambda_pos=0.0, vespo_k_neg=1.5, vespo_lambda_neg=4.0,
         _vllm=True, vllm_importance_sampling_mode="token_truncate"),
    dict(loss_type="dr_grpo", max_completion_length=9, gradient_accumulation_steps=3, _per_token=True),
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.05, _per_token=True),
    dict(loss_type="luspo", importance_sampling_level="sequence", entropy_coef=0.1, top_entropy_quantile=0.5),
]


def _name(c):
    return ",".join(f"{k}={v}" for k, v in c.items())


def _split(case):
    opts = {k: v for k, v in case.items() if not k.startswith("_")}
    opts.setdefault("max_completion_length", 8)
    per_call = {k: opts.pop(k) for k in ("num_items_in_batch",) if k in opts}
    return opts, per_call


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_grpo_loss_matches_float64_reference(case):
    opts, per_call = _split(case)
    b = batch(per_token_advantages=case.get("_per_token", False))
    if not case.get("_vllm"):
        b["sampling_logps"] = None
    ins = {k: leaf64(v) if k in ("logps", "entropy") else v for k, v in b.items()}
    loss, metrics = fa.grpo_loss(ins["logps"], ins["old_logps"], ins["advantages"], ins["mask"],
                                 ref_logps=ins["ref_logps"], sampling_logps=ins["sampling_logps"],
                                 entropy=ins["entropy"], **per_call, **opts)
    ref_ins = {k: leaf64(v) if k in ("logps", "entropy") else v for k, v in b.items()}
    ref_loss, ref_metrics = grpo_loss_reference(ref_ins["logps"], ref_ins["old_logps"], ref_ins["advantages"],
                                                ref_ins["mask"], ref_logps=ref_ins["ref_logps"],
                                                sampling_logps=ref_ins["sampling_logps"], entropy=ref_ins["entropy"],
                                                **per_call, **opts)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12, abs=1e-14)
    g = torch.autograd.grad(loss, [ins["logps"], ins["entropy"]], allow_unused=True)
    g_ref = torch.autograd.grad(ref_loss, [ref_ins["logps"], ref_ins["entropy"]], allow_unused=True)
    for a, e in zip(g, g_ref):
        a = torch.zeros_like(b["logps"]) if a is None else a
        e = torch.zeros_like(b["logps"]) if e is None else e
        assert torch.allclose(a, e, rtol=1e-10, atol=1e-13)
    assert set(ref_metrics) <= set(metrics), set(ref_metrics) - set(metrics)
    for k, v in ref_metrics.items():
        got = metrics[k].item()
        assert (math.isnan(v) and math.isnan(got)) or got == pytest.approx(v, rel=1e-10, abs=1e-13), k
    assert all(t.dim() == 0 and not t.requires_grad for t in metrics.values())


def test_reference_cases_exercise_what_they_name():
    """The reference cases are not vacuous: clipping, masks and the vLLM ratio each change the loss here."""
    b = batch()
    base = dict(ref_logps=b["ref_logps"], entropy=b["entropy"], max_completion_length=8)
    args = (b["logps"], b["old_logps"], b["advantages"], b["mask"])

    def loss(**kw):
        return fa.grpo_loss(*args, **{**base, **kw})[0].item()
    plain = loss()
    for kw in (dict(epsilon_high=0.28), dict(delta=1.1), dict(top_entropy_quantile=0.4), dict(beta=0.04),
               dict(off_policy_mask_threshold=0.05), dict(importance_sampling_level="sequence"),
               dict(sampling_logps=b["sampling_logps"], vllm_importance_sampling_mode="token_mask",
                    vllm_importance_sampling_clip_min=0.6, vllm_importance_sampling_clip_max=1.4)):
        assert loss(**kw) != pytest.approx(plain, rel=1e-6), kw
    assert loss(beta=0.04) != pytest.approx(loss(beta=0.04, use_bias_correction_kl=False), rel=1e-6)


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_gradcheck(loss_type):
    """Finite differences of the loss in ℓ and in the entropy (through the bonus), both IS levels. cispo and
    vespo stop the gradient of their weights (sg(min(w, ε_h)), sg(φ(W))): their check moves ℓ_old with ℓ, so the
    weights stay what they are and finite differences see exactly the surrogate whose gradient is taken (the KL
    term then without the bias correction, whose weight w is differentiable)."""
    b = batch(seed=1)
    stopped = loss_type in ("cispo", "vespo")
    for level in ("token", "sequence"):
        opts = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.03, entropy_coef=0.05,
                    max_completion_length=8, epsilon_high=1.5 if loss_type == "cispo" else None,
                    use_bias_correction_kl=not stopped)

        base = b["logps"].clone()  # gradcheck perturbs its inputs in place (leaf64 of float64 shares storage)

        def f(lp, h):
            old = b["old_logps"] + (lp - base) if stopped else b["old_logps"]
            return fa.grpo_loss(lp, old, b["advantages"], b["mask"], ref_logps=b["ref_logps"], entropy=h, **opts)[0]
        assert torch.autograd.gradcheck(f, (leaf64(b["logps"]), leaf64(b["entropy"])), eps=1e-7, atol=1e-8,
                                        fast_mode=True)


def test_options_bundle_and_keywords_agree():
    b = batch()
    args = (b["logps"], b["old_logps"], b["advantages"], b["mask"])
    o = fa.GRPOOptions(loss_type="grpo", beta=0.1, epsilon_high=0.28)
    l1, m1 = fa.grpo_loss(*args, ref_logps=b["ref_logps"], options=o)
    l2, m2 = fa.grpo_loss(*args, ref_logps=b["ref_logps"], loss_type="grpo", beta=0.1, epsilon_high=0.28)
    l3, _ = fa.grpo_loss(*args, ref_logps=b["ref_logps"], options=dataclasses.replace(o, beta=0.0), beta=0.1)
    assert l1.item() == l2.item() == l3.item() and m1.keys() == m2.keys()
    assert fa.GRPOOptions().loss_type == "dapo" and fa.GRPOOptions(epsilon=0.3).eps_high == 0.3
    for f in dataclasses.fields(fa.GRPOOptions):
        assert f.metadata.get("help"), f"GRPOOptions.{f.name} has no help text"


def test_on_policy_old_logps_none_is_ratio_one():
    """old_logps=None means on-policy (TRL's per_token_logps.detach()): w = 1, and dapo's gradient is −A/N."""
    b = batch()
    lp = leaf64(b["logps"])
    loss, m = fa.grpo_loss(lp, None, b["advantages"], b["mask"])
    loss.backward()
    n = b["mask"].sum()
    assert torch.allclose(lp.grad, torch.where(b["mask"], -b["advantages"][:, None] / n, 0.0), atol=1e-15)
    assert m["clip_ratio/region_mean"].item() == 0.0


# --- the fused twin on both backends -----------------------------------------------------------------------------
FUSED_CASES = [
    dict(),
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.05, entropy_coef=0.02,
         top_entropy_quantile=0.5),
    dict(loss_type="cispo", epsilon_high=2.0, _vllm=True, vllm_importance_sampling_mode="token_truncate",
         vllm_importance_sampling_clip_min=0.5),
    dict(loss_type="dr_grpo", max_completion_length=12, delta=1.2, off_policy_mask_threshold=0.1, _vllm=True),
    dict(loss_type="vespo", entropy_coef=0.05),
]


# every case on the torch backend; the Triton interpreter (slow) on the two that use every output of the head
FUSED = [("torch", c) for c in FUSED_CASES] + [("triton", FUSED_CASES[0]), ("triton", FUSED_CASES[1])]
assert {b for b, _ in FUSED} == set(BACKENDS)


@pytest.mark.parametrize("backend, case", FUSED, ids=lambda x: x if isinstance(x, str) else (_name(x) or "dapo"))
def test_linear_grpo_loss_matches_reference(backend, case):
    """hidden (B, T, H) → fused log-probs + entropy → grpo_loss, against materialised float64 logits: loss and the
    gradients of hidden, weight and bias; V = 131 (not a tile multiple), temperature, bias, ignore_index = −1."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 4, 7, 24, 131
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 2
    bias = torch.randn(V, generator=g) / 4
    targets = torch.randint(0, V, (B, T), generator=g)
    for i, n in enumerate((7, 4, 0, 6)):
        targets[i, n:] = -1
    with torch.no_grad():
        cur = linear_logps_reference(hidden, weight, targets, bias=bias, temperature=0.8, ignore_index=-1,
                                     dtype=D)
    mask = targets != -1
    old = (cur + 0.3 * torch.randn(B, T, generator=g, dtype=D)).masked_fill(~mask, 0)
    ref = (cur + 0.3 * torch.randn(B, T, generator=g, dtype=D)).masked_fill(~mask, 0)
    sampling = (old + 0.3 * torch.randn(B, T, generator=g, dtype=D)).masked_fill(~mask, 0) if case.get("_vllm") \
        else None
    A = torch.tensor([0.9, -1.3, 0.5, -0.2])
    opts = {k: v for k, v in case.items() if not k.startswith("_")}
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    h, w, bb = (t.to(device).requires_grad_() for t in (hidden, weight, bias))
    loss, metrics = fa.linear_grpo_loss(h, w, mv(targets), mv(old.float()), mv(A), ref_logps=mv(ref.float()),
                                        sampling_logps=mv(None if sampling is None else sampling.float()), bias=bb,
                                        temperature=0.8, ignore_index=-1, backend=backend, **opts)
    loss.backward()
    h64, w64, b64 = leaf64(hidden), leaf64(weight), leaf64(bias)
    ref_loss, ref_metrics = linear_grpo_loss_reference(h64, w64, targets, old, A.double(), bias=b64, temperature=0.8,
                                                       ignore_index=-1, ref_logps=ref, sampling_logps=sampling, **opts)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-4, abs=1e-6)
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad), (bb.grad, b64.grad)):
        assert rel_err(got, want) < 1e-4
    for k, v in ref_metrics.items():
        assert metrics[k].item() == pytest.approx(v, rel=1e-4, abs=1e-5), k


# --- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(loss_type="ppo"), "loss_type must be one of"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level must be 'token' or 'sequence'"),
    (dict(epsilon=-0.1), "epsilon must be >= 0"),
    (dict(delta=0.0), "delta must be > 0"),
    (dict(beta=-1.0), "beta must be >= 0"),
    (dict(top_entropy_quantile=1.5), r"top_entropy_quantile must lie in \[0, 1\]"),
    (dict(sapo_temperature_pos=0.0), "sapo_temperature_pos must be > 0"),
    (dict(vllm_importance_sampling_mode="token"), "vllm_importance_sampling_mode must be one of"),
    (dict(vllm_importance_sampling_clip_min=3.0), r"clip_min \(3.0\) must be less than"),
    (dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None),
     "needs vllm_importance_sampling_clip_min or vllm_importance_sampling_clip_max"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be an int >= 1"),
    (dict(max_completion_length=0), "max_completion_length must be a positive int"),
    (dict(epsilon=math.nan), "epsilon must be a finite number"),
])
def test_bad_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        fa.GRPOOptions(**kw)
    b = batch()
    with pytest.raises(ValueError, match=match):
        fa.grpo_loss(b["logps"], b["old_logps"], b["advantages"], b["mask"], **kw)


def test_dr_grpo_needs_max_completion_length_at_the_call():
    """A bundle may be completed later (a trainer fills max_completion_length from its own layout); the loss call
    refuses dr_grpo without it."""
    opts = fa.GRPOOptions(loss_type="dr_grpo")
    b = batch()
    with pytest.raises(ValueError, match="pass max_completion_length"):
        fa.grpo_loss(b["logps"], b["old_logps"], b["advantages"], b["mask"], options=opts)
    fa.grpo_loss(b["logps"], b["old_logps"], b["advantages"], b["mask"], options=opts, max_completion_length=5)


def test_bad_calls_are_refused():
    b = batch()
    args = (b["logps"], b["old_logps"], b["advantages"], b["mask"])
    with pytest.raises(TypeError, match="unexpected keyword argument.*'clip_eps'.*epsilon"):
        fa.grpo_loss(*args, clip_eps=0.2)
    with pytest.raises(TypeError, match="options must be a GRPOOptions"):
        fa.grpo_loss(*args, options=dict(beta=0.1))
    with pytest.raises(ValueError, match="beta > 0 needs ref_logps"):
        fa.grpo_loss(*args, beta=0.1)
    with pytest.raises(ValueError, match="need the per-token entropy"):
        fa.grpo_loss(*args, top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match="vespo' takes per-token vLLM ratios"):
        fa.grpo_loss(*args, loss_type="vespo", sampling_logps=b["sampling_logps"])
    with pytest.raises(ValueError, match=r"advantages shape \(3,\) must be \(B,\) = \(4,\)"):
        fa.grpo_loss(b["logps"], b["old_logps"], b["advantages"][:3], b["mask"])
    with pytest.raises(ValueError, match="old_logps shape"):
        fa.grpo_loss(b["logps"], b["old_logps"][:, :3], b["advantages"], b["mask"])
    with pytest.raises(ValueError, match=r"logps must be \(B, T\)"):
        fa.grpo_loss(b["logps"].flatten(), None, b["advantages"], b["mask"].flatten())
    with pytest.raises(ValueError, match=r"linear_grpo_loss needs hidden \(B, T, H\)"):
        fa.linear_grpo_loss(torch.randn(5, 8), torch.randn(11, 8), torch.zeros(5, dtype=torch.long), None,
                            torch.zeros(5))


def test_readme_lists_every_loss_type():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [t for t in LOSS_TYPES if f"| `{t}`" not in readme and f"| `{t}` (default)" not in readme]
    assert not missing, f"README's GRPO table lacks {missing}"
    assert all(LOSS_TYPES[t].paper for t in LOSS_TYPES)
