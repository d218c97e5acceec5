"""KL estimators, fused PPO/GRPO loss and the clipped value loss."""

import math

import pytest
import torch
from helpers import BACKENDS, device_for, leaf64, rel_err

import fusealign as fa
from fusealign.kernels.reference import linear_logps_reference, ppo_loss_reference, ppo_policy_loss_reference

T = torch.tensor


def test_kl_estimators_by_hand():
    """logp = −1, ref = −2: log r = ref − logp = −1.
    k1 = 1;  k2 = ½·1 = 0.5;  k3 = (e^{−1} − 1) + 1 = e^{−1} = 0.3678794412."""
    lp, ref = T([-1.0], dtype=torch.float64), T([-2.0], dtype=torch.float64)
    assert fa.kl_estimate(lp, ref, "k1").item() == 1.0
    assert fa.kl_estimate(lp, ref, "k2").item() == 0.5
    assert fa.kl_estimate(lp, ref, "k3").item() == pytest.approx(math.exp(-1), abs=1e-15)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimator_gradients(estimator):
    lp = torch.randn(7, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(7, dtype=torch.float64)
    fa.kl_estimate(lp, ref, estimator).sum().backward()
    d = lp.detach() - ref  # d/dlogp: k1 → 1, k2 → d, k3 = e^{−d} + d − 1 → 1 − e^{−d}
    expected = {"k1": torch.ones_like(d), "k2": d, "k3": 1 - torch.exp(-d)}[estimator]
    assert torch.allclose(lp.grad, expected, atol=1e-12)


def test_kl_estimators_expectation_monte_carlo():
    """E_{y~π}[k1] = E[k3] = KL(π‖π_ref) exactly; k2 is biased but close when π ≈ π_ref."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, generator=g, dtype=torch.float64)
    for noise, k2_rel in ((1.0, None), (0.1, 0.05)):
        logp = torch.log_softmax(z, 0)
        logq = torch.log_softmax(z + noise * torch.randn(6, generator=g, dtype=torch.float64), 0)
        exact = (logp.exp() * (logp - logq)).sum().item()
        y = torch.multinomial(logp.exp(), 400_000, replacement=True, generator=g)
        for est in ("k1", "k3"):
            k = fa.kl_estimate(logp[y], logq[y], est)
            se = k.std().item() / math.sqrt(k.numel())
            assert abs(k.mean().item() - exact) < 5 * se, (est, noise, k.mean().item(), exact)
        if k2_rel:
            k2 = fa.kl_estimate(logp[y], logq[y], "k2").mean().item()
            assert abs(k2 - exact) < k2_rel * exact


def make_rollout(B=3, Tn=7, H=16, V=50, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, Tn, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 3
    targets = torch.randint(0, V, (B, Tn), generator=g)
    targets[:, :2] = -100
    targets[1, -2:] = -100
    with torch.no_grad():
        cur = linear_logps_reference(hidden, weight, targets)
    old = cur + 0.5 * torch.randn(B, Tn, generator=g)  # some ratios clip at ε = 0.2
    ref = cur + 0.2 * torch.randn(B, Tn, generator=g)
    adv = torch.randn(B, Tn, generator=g)
    mv = lambda t: t.to(device)  # noqa: E731
    return tuple(map(mv, (hidden, weight, targets, old, adv, ref)))


PPO_CASES = [
    dict(),
    dict(loss_agg="seq-mean-token-sum"),
    dict(loss_agg="seq-mean-token-mean", clip_eps_high=0.28),
    dict(dual_clip=3.0, entropy_coef=0.01),
    dict(kl_coef=0.1, kl_estimator="k3", temperature=0.8),
    dict(kl_coef=0.05, kl_estimator="k1", entropy_coef=0.02, loss_agg="seq-mean-token-mean"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PPO_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_linear_ppo_matches_reference(backend, case):
    hidden, weight, targets, old, adv, ref = make_rollout(device=device_for(backend))
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = fa.linear_ppo_loss(h, W, targets, old, adv, ref_logps=ref, backend=backend, **case)
    h64, W64 = leaf64(hidden), leaf64(weight)
    expected = ppo_loss_reference(h64, W64, targets, old.double(), adv.double(), ref_logps=ref.double(), **case)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    loss.backward()
    expected.backward()
    assert rel_err(h.grad, h64.grad) < 1e-4 and rel_err(W.grad, W64.grad) < 1e-4
    assert {"policy/clipfrac", "policy/approxkl", "policy/entropy", "policy/ratio_mean", "objective/kl"} <= set(metrics)
    assert 0 < metrics["policy/clipfrac"].item() < 1


def test_grpo_per_sequence_advantages_broadcast():
    hidden, weight, targets, old, adv, _ = make_rollout()
    seq_adv = T([1.0, -0.5, 0.25])
    a, _ = fa.linear_ppo_loss(hidden, weight, targets, old, seq_adv, backend="torch")
    b, _ = fa.linear_ppo_loss(hidden, weight, targets, old, seq_adv[:, None].expand(3, 7), backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step0_identities(backend):
    """old = current policy and ref = current policy: ratio 1, clipfrac 0, approx KL 0, KL 0,
    and the token-mean loss is −mean(A)."""
    hidden, weight, targets, _, adv, _ = make_rollout(device=device_for(backend))
    with torch.no_grad():
        cur = fa.linear_logps(hidden, weight, targets, backend=backend)
    loss, m = fa.linear_ppo_loss(hidden, weight, targets, cur, adv, ref_logps=cur, kl_coef=0.1, backend=backend)
    mask = targets != -100
    assert m["policy/ratio_mean"].item() == 1.0
    assert m["policy/clipfrac"].item() == 0.0 and m["policy/approxkl"].item() == 0.0
    assert m["objective/kl"].item() == 0.0
    assert loss.item() == pytest.approx(-adv[mask].mean().item(), abs=1e-6)


def test_ppo_errors():
    hidden, weight, targets, old, adv, ref = make_rollout()
    call = lambda **k: fa.linear_ppo_loss(hidden, weight, targets, old, adv, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"loss_agg must be one of \('token-mean'"):
        call(loss_agg="sum")
    with pytest.raises(ValueError, match=r"kl_estimator must be one of \['k1', 'k2', 'k3'\]"):
        call(kl_estimator="k4")
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logps"):
        call(kl_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        call(dual_clip=0.5)
    with pytest.raises(ValueError, match="advantages shape"):
        fa.linear_ppo_loss(hidden, weight, targets, old, torch.zeros(5))
    with pytest.raises(ValueError, match="old_logps shape"):
        fa.linear_ppo_loss(hidden, weight, targets, old[:, :3], adv)
    with pytest.raises(ValueError, match="estimator must be one of"):
        fa.kl_estimate(old, ref, "k9")
    mod = fa.LinearPPOLoss(clip_eps=0.1, backend="torch")
    assert torch.equal(mod(hidden, weight, targets, old, adv)[0],
                       fa.linear_ppo_loss(hidden, weight, targets, old, adv, clip_eps=0.1, backend="torch")[0])


def test_value_loss_by_hand():
    """values (1, 1), old (0.5, 0.5), returns (0, 2), ε = 0.2: v_clip = 0.5 + clip(0.5) = 0.7.
    token 1: (1−0)² = 1 vs (0.7−0)² = 0.49 → 1 (unclipped);  token 2: (1−2)² = 1 vs (0.7−2)² = 1.69 → 1.69.
    loss = ½·(1 + 1.69)/2 = 0.6725, clipfrac = 1/2."""
    values = T([1.0, 1.0], requires_grad=True)
    loss, m = fa.value_loss(values, T([0.5, 0.5]), T([0.0, 2.0]), clip_eps=0.2)
    assert loss.item() == pytest.approx(0.6725)
    assert m["val/clipfrac"].item() == 0.5
    loss.backward()
    # Only the unclipped token has a gradient: ½·2·(1 − 0)/2 = 0.5; the clipped one is constant in v.
    assert torch.allclose(values.grad, T([0.5, 0.0]))
    masked, _ = fa.value_loss(values, T([0.5, 0.5]), T([0.0, 2.0]), mask=T([True, False]))
    assert masked.item() == pytest.approx(0.5)
    unclipped, _ = fa.value_loss(values, T([0.5, 0.5]), T([0.0, 2.0]), clip_eps=None)
    assert unclipped.item() == pytest.approx(0.5)


@pytest.mark.parametrize("case", PPO_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_ppo_policy_loss_matches_reference_on_logps(case):
    """The tensor-level twin on per-token log-probs, values and gradients, against the token-by-token reference."""
    case = {k: v for k, v in case.items() if k != "temperature"}
    g = torch.Generator().manual_seed(7)
    logps = (-torch.rand(3, 6, generator=g, dtype=torch.float64) * 3).requires_grad_()
    entropy = (torch.rand(3, 6, generator=g, dtype=torch.float64) * 2).requires_grad_()
    old = logps.detach() + 0.4 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    ref = logps.detach() + 0.2 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 6, generator=g) > 0.25
    loss, metrics = fa.ppo_policy_loss(logps, entropy, old, adv, mask, ref_logps=ref, **case)
    lp2, en2 = logps.detach().clone().requires_grad_(), entropy.detach().clone().requires_grad_()
    expected = ppo_policy_loss_reference(lp2, en2, old, adv, mask, ref_logps=ref, **case)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-12)
    loss.backward()
    expected.backward()
    assert torch.allclose(logps.grad, lp2.grad, atol=1e-12)
    if case.get("entropy_coef"):
        assert torch.allclose(entropy.grad, en2.grad, atol=1e-12)
    else:
        assert entropy.grad is None and en2.grad is None
    assert 0 < metrics["policy/clipfrac"].item() < 1


def test_linear_ppo_loss_is_linear_logps_plus_the_twin():
    hidden, weight, targets, old, adv, ref = make_rollout()
    kw = dict(ref_logps=ref, kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
    fused, fm = fa.linear_ppo_loss(hidden, weight, targets, old, adv, backend="torch", **kw)
    logps, entropy = fa.linear_logps(hidden, weight, targets, return_entropy=True, backend="torch")
    twin, tm = fa.ppo_policy_loss(logps, entropy, old, adv, targets != -100, **kw)
    assert torch.equal(fused, twin) and fm.keys() == tm.keys()


# --- the sampler-mismatch correction (TRL 1.16's vllm_importance_sampling_*, here for PPO) -------------------------
IS_CASES = [("token_truncate", None, 1.5), ("token_truncate", 0.8, 1.2), ("token_mask", 0.7, 1.4),
            ("sequence_truncate", 0.5, 2.0), ("sequence_mask", None, 3.0), ("sequence_mask", 0.3, 3.0)]


def _is_rollout(seed=11):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(4, 6, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    sampling = old + 0.4 * torch.randn(4, 6, generator=g, dtype=torch.float64)  # the sampler's own log-probs
    adv = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) > 0.2
    mask[:, 0] = True
    return logps, old, sampling, adv, mask


@pytest.mark.parametrize("mode,lo,hi", IS_CASES, ids=lambda x: str(x))
def test_ppo_sampler_correction_matches_reference(mode, lo, hi):
    """ppo_policy_loss with sampling_logps: loss and gradient against the token-by-token reference, every TRL mode;
    the metrics against a hand computation; some ratios hit the bounds (else the case tests nothing)."""
    logps, old, sampling, adv, mask = _is_rollout()
    kw = dict(vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=lo,
              vllm_importance_sampling_clip_max=hi, kl_coef=0.05, dual_clip=3.0)
    ref = old - 0.1
    loss, metrics = fa.ppo_policy_loss(logps, None, old, adv, mask, ref_logps=ref, sampling_logps=sampling, **kw)
    lp2 = logps.detach().clone().requires_grad_()
    expected = ppo_policy_loss_reference(lp2, None, old, adv, mask, ref_logps=ref, sampling_logps=sampling, **kw)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-12)
    loss.backward()
    expected.backward()
    assert torch.allclose(logps.grad, lp2.grad, atol=1e-12)
    # by hand: log r per token (or its sum per sequence), clamped or zeroed outside [lo, hi]
    log_r = torch.where(mask, old - sampling, 0.0)
    raw = log_r.sum(1).exp() if mode.startswith("sequence") else log_r.exp()[mask]
    lo_, hi_ = (-math.inf if lo is None else lo), (math.inf if hi is None else hi)
    r = raw.clamp(lo_, hi_) if mode.endswith("truncate") else torch.where((raw < lo_) | (raw > hi_), 0.0, raw)
    assert ((raw < lo_) | (raw > hi_)).any(), "no ratio reaches a bound: the case does not test the clipping"
    diff = (old - sampling).abs()[mask]
    assert metrics["sampling/sampling_logp_difference/mean"].item() == pytest.approx(diff.mean().item(), rel=1e-12)
    assert metrics["sampling/sampling_logp_difference/max"].item() == pytest.approx(diff.max().item(), rel=1e-12)
    assert metrics["sampling/importance_sampling_ratio/min"].item() == pytest.approx(r.min().item(), rel=1e-12)
    assert metrics["sampling/importance_sampling_ratio/mean"].item() == pytest.approx(r.mean().item(), rel=1e-12)
    assert metrics["sampling/importance_sampling_ratio/max"].item() == pytest.approx(r.max().item(), rel=1e-12)


def test_ppo_sampler_correction_identities():
    """A sampler that agrees with the scorer gives ratio exactly 1 (the loss without correction, bit for bit); the
    correction off ignores sampling_logps; token modes on (N,) tokens equal (B, T); sequence modes need (B, T);
    linear_ppo_loss passes sampling_logps through."""
    logps, old, sampling, adv, mask = _is_rollout(3)
    plain, pm = fa.ppo_policy_loss(logps, None, old, adv, mask)
    same, sm = fa.ppo_policy_loss(logps, None, old, adv, mask, sampling_logps=old.clone())
    assert torch.equal(plain, same)
    assert sm["sampling/importance_sampling_ratio/min"].item() == 1.0 == sm["sampling/importance_sampling_ratio/max"]
    assert sm["sampling/sampling_logp_difference/max"].item() == 0.0
    off, om = fa.ppo_policy_loss(logps, None, old, adv, mask, sampling_logps=sampling,
                                 vllm_importance_sampling_correction=False)
    assert torch.equal(plain, off) and om.keys() == pm.keys()
    tok = dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=1.3)
    padded, _ = fa.ppo_policy_loss(logps, None, old, adv, mask, sampling_logps=sampling, **tok)
    flat, _ = fa.ppo_policy_loss(logps[mask], None, old[mask], adv[mask], torch.ones(int(mask.sum()), dtype=torch.bool),
                                 sampling_logps=sampling[mask], **tok)
    assert flat.item() == pytest.approx(padded.item(), rel=1e-12)
    assert not torch.equal(padded, plain)
    with pytest.raises(ValueError, match="one ratio per sequence: pass \\(B, T\\) tensors"):
        fa.ppo_policy_loss(logps[mask], None, old[mask], adv[mask], torch.ones(int(mask.sum()), dtype=torch.bool),
                           sampling_logps=sampling[mask])
    with pytest.raises(ValueError, match="sampling_logps shape"):
        fa.ppo_policy_loss(logps, None, old, adv, mask, sampling_logps=sampling[:, :3])
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode must be one of"):
        fa.PPOOptions(vllm_importance_sampling_mode="token")
    with pytest.raises(ValueError, match="needs vllm_importance_sampling_clip_min or vllm_importance_sampling_clip_max"):
        fa.PPOOptions(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None)
    hidden, weight, targets, old_t, adv_t, _ = make_rollout()
    with torch.no_grad():
        smp = old_t + 0.3
    fused, fm = fa.linear_ppo_loss(hidden, weight, targets, old_t, adv_t, sampling_logps=smp, backend="torch", **tok)
    lp, en = fa.linear_logps(hidden, weight, targets, return_entropy=True, backend="torch")
    twin, _ = fa.ppo_policy_loss(lp, en, old_t, adv_t, targets != -100, sampling_logps=smp, **tok)
    assert torch.equal(fused, twin) and "sampling/importance_sampling_ratio/mean" in fm
