"""DPO family, fused DPO from hidden states, Bradley-Terry and sequence rewards."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, device_for, leaf64, rel_err

import fusealign as fa
from fusealign.kernels.reference import dpo_loss_reference, linear_dpo_loss_reference, sequence_rewards_reference

T = torch.tensor


# --- hand-computed cases --------------------------------------------------------------------------
def test_dpo_sigmoid_by_hand():
    """π_c = −1, π_r = −3, ref_c = ref_r = −2, β = 0.5:
    Δ = (−1 + 3) − (−2 + 2) = 2, βΔ = 1, loss = −log σ(1) = log(1 + e^{−1}) = 0.3132616875;
    rewards: 0.5·(−1 + 2) = 0.5 and 0.5·(−3 + 2) = −0.5."""
    losses, cr, rr = fa.dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), beta=0.5)
    assert losses.item() == pytest.approx(0.3132616875182228, abs=1e-7)
    assert cr.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)


@pytest.mark.parametrize("loss_type,kw,expected,why", [
    ("ipo", dict(beta=0.5), 1.0, "(Δ − 1/(2β))² = (2 − 1)² = 1"),
    ("hinge", dict(beta=0.5), 0.0, "max(0, 1 − 0.5·2) = 0"),
    ("hinge", dict(beta=0.25), 0.5, "max(0, 1 − 0.25·2) = 0.5"),
    ("sigmoid", dict(beta=0.5, label_smoothing=0.1), 0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.exp(1)),
     "0.9·(−log σ(1)) + 0.1·(−log σ(−1)) = 0.9·0.31326 + 0.1·1.31326 = 0.41326"),
    ("robust", dict(beta=0.5, label_smoothing=0.1),
     (0.9 * math.log1p(math.exp(-1)) - 0.1 * math.log1p(math.exp(1))) / 0.8,
     "[0.9·0.31326 − 0.1·1.31326] / 0.8 = 0.18826"),
])
def test_dpo_variants_by_hand(loss_type, kw, expected, why):
    """Same pair as above (Δ = 2); the arithmetic is in `why`."""
    losses, _, _ = fa.dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), loss_type=loss_type, **kw)
    assert losses.item() == pytest.approx(expected, abs=1e-6), why


def test_simpo_by_hand():
    """Reference-free: π_c = −1, π_r = −3 (length-normalised), β = 2, γ = 1:
    βΔ − γ = 2·2 − 1 = 3, loss = log(1 + e^{−3}) = 0.0485873516; rewards β·π = −2 and −6."""
    losses, cr, rr = fa.dpo_loss(T([-1.0]), T([-3.0]), None, None, loss_type="simpo", beta=2.0, gamma=1.0)
    assert losses.item() == pytest.approx(0.04858735157374196, abs=1e-7)
    assert cr.item() == -2.0 and rr.item() == -6.0


def test_bradley_terry_by_hand():
    """r_c = 1, r_r = 0, margin 0.5: −log σ(0.5) = log(1 + e^{−0.5}) = 0.4740769842;
    centring 0.1·(1 + 0)² adds 0.1."""
    assert fa.bradley_terry_loss(T([1.0]), T([0.0]), margin=T([0.5])).item() == pytest.approx(0.4740769841801067)
    loss = fa.BradleyTerryLoss(center_coef=0.1)(T([1.0]), T([0.0]), margin=0.5)
    assert loss.item() == pytest.approx(0.5740769841801067)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo", "simpo"])
def test_dpo_loss_matches_reference_with_grads(loss_type):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(8, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    pc.requires_grad_(), pr.requires_grad_()
    kw = dict(beta=0.3, label_smoothing=0.1 if loss_type in ("sigmoid", "robust", "simpo") else 0.0,
              gamma=0.5 if loss_type == "simpo" else 0.0)
    losses, _, _ = fa.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, **kw)
    ref = dpo_loss_reference(pc, pr, rc, rr, loss_type=loss_type, **kw)
    assert torch.allclose(losses, ref, atol=1e-12)
    (g1,) = torch.autograd.grad(losses.sum(), pc)
    (g2,) = torch.autograd.grad(ref.sum(), pc)
    assert torch.allclose(g1, g2, atol=1e-12)


def test_dpo_step0_is_log2():
    lp = torch.randn(5)
    losses, cr, rr = fa.dpo_loss(lp, lp - 1, lp, lp - 1)
    assert torch.allclose(losses, torch.full((5,), math.log(2.0)))
    assert torch.count_nonzero(cr) == 0 and torch.count_nonzero(rr) == 0


def test_dpo_loss_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"loss_type must be one of \['hinge', 'ipo', 'robust', 'sigmoid', 'simpo'\]"):
        fa.dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="same B"):
        fa.dpo_loss(x, torch.zeros(4), x, x)
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        fa.dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        fa.dpo_loss(x, x, x, x, beta=-0.1)
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        fa.dpo_loss(x, x, None, None)
    with pytest.raises(ValueError, match="gamma"):
        fa.dpo_loss(x, x, x, x, gamma=1.0)
    with pytest.raises(ValueError, match="chosen_rewards shape"):
        fa.bradley_terry_loss(x, torch.zeros(2))


# --- fused DPO ------------------------------------------------------------------------------------
def make_pairs(B=3, Tn=9, H=16, V=60, dtype=torch.float32, device="cpu", seed=0):
    """Padded [chosen; rejected]: prompts of 2–4 tokens (ignored), completions, right padding (ignored)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, Tn, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / 3).to(dtype)
    ref_weight = (weight.float() + 0.05 * torch.randn(V, H, generator=g)).to(dtype)
    ref_hidden = (hidden.float() + 0.1 * torch.randn(2 * B, Tn, H, generator=g)).to(dtype)
    targets = torch.randint(0, V, (2 * B, Tn), generator=g)
    lengths = []
    for i in range(2 * B):
        prompt = 2 + i % 3
        end = Tn - (i % 4)  # 0–3 padding positions
        targets[i, :prompt] = -100
        targets[i, end:] = -100
        lengths.append(end)
    mv = lambda t: t.to(device)  # noqa: E731
    return mv(hidden), mv(weight), mv(targets), mv(ref_hidden), mv(ref_weight), lengths


CASES = [
    dict(loss_type="sigmoid"),
    dict(loss_type="sigmoid", label_smoothing=0.2, nll_coef=0.5),
    dict(loss_type="robust", label_smoothing=0.1),
    dict(loss_type="hinge", beta=0.5),
    dict(loss_type="ipo", average_logps=True),
    dict(loss_type="simpo", average_logps=True, beta=2.0, gamma=0.5),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_linear_dpo_matches_reference(backend, case):
    hidden, weight, targets, ref_hidden, ref_weight, _ = make_pairs(device=device_for(backend))
    refs = {} if case["loss_type"] == "simpo" else dict(ref_hidden=ref_hidden, ref_weight=ref_weight)
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = fa.linear_dpo_loss(h, W, targets, backend=backend, **refs, **case)
    h64, W64 = leaf64(hidden), leaf64(weight)
    refs64 = {k: v.double() for k, v in refs.items()}
    ref = linear_dpo_loss_reference(h64, W64, targets, **refs64, **case)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    loss.backward()
    ref.backward()
    assert rel_err(h.grad, h64.grad) < 1e-4 and rel_err(W.grad, W64.grad) < 1e-4
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                            "logps/chosen", "logps/rejected", "nll"}
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_linear_dpo_close_to_reference(backend):
    hidden, weight, targets, ref_hidden, ref_weight, _ = make_pairs(dtype=torch.bfloat16, device=device_for(backend))
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = fa.linear_dpo_loss(h, W, targets, ref_hidden=ref_hidden, ref_weight=ref_weight, backend=backend)
    h64, W64 = leaf64(hidden), leaf64(weight)
    ref = linear_dpo_loss_reference(h64, W64, targets, ref_hidden=ref_hidden.double(), ref_weight=ref_weight.double())
    assert loss.item() == pytest.approx(ref.item(), abs=1e-3)
    loss.backward()
    ref.backward()
    assert rel_err(h.grad, h64.grad) < 1e-2 and rel_err(W.grad, W64.grad) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_precomputed_and_on_the_fly_reference_agree(backend):
    hidden, weight, targets, ref_hidden, ref_weight, _ = make_pairs(device=device_for(backend))
    B = hidden.shape[0] // 2
    with torch.no_grad():
        ref_seq = fa.linear_logps(ref_hidden, ref_weight, targets, backend=backend).sum(-1)
    a, ma = fa.linear_dpo_loss(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=ref_weight, backend=backend)
    b, mb = fa.linear_dpo_loss(hidden, weight, targets, ref_chosen_logps=ref_seq[:B], ref_rejected_logps=ref_seq[B:],
                               backend=backend)
    assert torch.equal(a, b)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("average_logps", [False, True])
def test_packed_equals_padded(backend, average_logps):
    hidden, weight, targets, ref_hidden, ref_weight, lengths = make_pairs(device=device_for(backend))
    kw = dict(beta=0.2, nll_coef=0.3, average_logps=average_logps, backend=backend)
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    padded, pm = fa.linear_dpo_loss(h, W, targets, ref_hidden=ref_hidden, ref_weight=ref_weight, **kw)
    padded.backward()
    # Pack: each sequence's unpadded prefix, concatenated; sequence_ids = row index.
    rows = [torch.arange(n) for n in lengths]
    idx_b = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    idx_t = torch.cat(rows)
    hp = hidden[idx_b, idx_t].clone().requires_grad_()
    Wp = weight.clone().requires_grad_()
    packed, km = fa.linear_dpo_loss(hp, Wp, targets[idx_b, idx_t], ref_hidden=ref_hidden[idx_b, idx_t],
                                    ref_weight=ref_weight, sequence_ids=idx_b.to(hidden.device), **kw)
    packed.backward()
    assert packed.item() == pytest.approx(padded.item(), abs=1e-6)
    assert all(torch.allclose(pm[k], km[k], atol=1e-6) for k in pm)
    assert rel_err(Wp.grad, W.grad) < 1e-5
    assert rel_err(hp.grad, h.grad[idx_b, idx_t]) < 1e-5


def test_policy_equal_reference_gives_log2():
    hidden, weight, targets, _, _, _ = make_pairs()
    loss, m = fa.linear_dpo_loss(hidden, weight, targets, ref_hidden=hidden, ref_weight=weight, backend="torch")
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert m["rewards/margins"].item() == 0.0


def test_linear_dpo_errors():
    hidden, weight, targets, ref_hidden, ref_weight, _ = make_pairs()
    B = hidden.shape[0] // 2
    rc = torch.zeros(B)
    call = lambda **k: fa.linear_dpo_loss(**{**dict(hidden=hidden, weight=weight, targets=targets), **k})  # noqa: E731
    with pytest.raises(ValueError, match="first dimension must be even"):
        call(hidden=hidden[:5], targets=targets[:5], ref_chosen_logps=rc, ref_rejected_logps=rc)
    with pytest.raises(ValueError, match="reference given twice"):
        call(ref_chosen_logps=rc, ref_rejected_logps=rc, ref_hidden=ref_hidden, ref_weight=ref_weight)
    with pytest.raises(ValueError, match="needs a reference"):
        call()
    with pytest.raises(ValueError, match="reference-free"):
        call(loss_type="simpo", ref_chosen_logps=rc, ref_rejected_logps=rc)
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \(B,\) = \(3,\)"):
        call(ref_chosen_logps=torch.zeros(4), ref_rejected_logps=torch.zeros(4))
    with pytest.raises(ValueError, match="pass both ref_hidden and ref_weight"):
        call(ref_hidden=ref_hidden)
    bad = targets.clone()
    bad[4] = -100
    with pytest.raises(ValueError, match="sequence 4 has no completion token"):
        call(targets=bad, ref_chosen_logps=rc, ref_rejected_logps=rc)
    # Packed: sequence ids that do not cover all 2B sequences.
    N = 12
    with pytest.raises(ValueError, match="sequence 3 has no completion token"):
        fa.linear_dpo_loss(hidden[0, :N // 2].repeat(2, 1), weight, torch.randint(0, 60, (N,)),
                           sequence_ids=torch.tensor([0, 1, 2] * 4), num_sequences=4,
                           ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    with pytest.raises(ValueError, match=r"sequence_ids must lie in \[0, 4\)"):
        fa.linear_dpo_loss(hidden[0, :N // 2].repeat(2, 1), weight, torch.randint(0, 60, (N,)),
                           sequence_ids=torch.tensor([0, 1, 2, 3, 4, 0] * 2), num_sequences=4,
                           ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))


def test_module_wrapper_dpo():
    hidden, weight, targets, ref_hidden, ref_weight, _ = make_pairs()
    loss, _ = fa.LinearDPOLoss(beta=0.2, backend="torch")(hidden, weight, targets, ref_hidden=ref_hidden,
                                                          ref_weight=ref_weight)
    expected, _ = fa.linear_dpo_loss(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=ref_weight, beta=0.2,
                                     backend="torch")
    assert torch.equal(loss, expected)


# --- reward model ---------------------------------------------------------------------------------
def test_sequence_rewards_left_right_padding_and_lengths():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 8, generator=g, dtype=torch.float64)
    w, b = torch.randn(1, 8, generator=g, dtype=torch.float64), torch.randn(1, generator=g, dtype=torch.float64)
    right = T([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    left = T([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    for mask in (right, left):
        got = fa.sequence_rewards(hidden, w, mask, value_bias=b)
        assert torch.allclose(got, sequence_rewards_reference(hidden, w, mask, b), atol=1e-12)
    by_len = fa.sequence_rewards(hidden, w.view(-1), right.sum(-1))
    assert torch.allclose(by_len, sequence_rewards_reference(hidden, w, right), atol=1e-12)
    with pytest.raises(ValueError, match="sequence 2 has no tokens"):
        fa.sequence_rewards(hidden, w, T([[1] * 6, [1] * 6, [0] * 6]))
    with pytest.raises(ValueError, match="sequence 0 has no tokens"):
        fa.sequence_rewards(hidden, w, T([0, 3, 7]))
    with pytest.raises(ValueError, match="value_weight must have H=8"):
        fa.sequence_rewards(hidden, torch.randn(7, dtype=torch.float64), right)


def test_bradley_terry_gradient_matches_autograd_formula():
    rc = torch.randn(6, dtype=torch.float64, requires_grad=True)
    rr = torch.randn(6, dtype=torch.float64)
    loss = fa.bradley_terry_loss(rc, rr, center_coef=0.05)
    loss.backward()
    # d/dr_c [−log σ(d)]/B = −σ(−d)/B;  d/dr_c 0.05·mean((r_c+r_r)²) = 0.1 (r_c + r_r)/B
    d = (rc - rr).detach()
    expected = (-torch.sigmoid(-d) + 0.1 * (rc.detach() + rr)) / 6
    assert torch.allclose(rc.grad, expected, atol=1e-12)
    assert loss.item() == pytest.approx((-F.logsigmoid(d)).mean().item() + 0.05 * ((rc + rr) ** 2).mean().item())
