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
# The pair used throughout: π_w = −1, π_l = −3, ref_w = ref_l = −2, so ρ_w = 1, ρ_l = −1 and Δ = ρ_w − ρ_l = 2.
PAIR = (T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]))
LN3 = math.log(3.0)  # β = ln 3 makes σ(βρ) rational: σ(ln 3) = 3/4, σ(−ln 3) = 1/4, σ(2 ln 3) = 9/10


def test_dpo_sigmoid_by_hand():
    """β = 0.5: βΔ = 1, loss = −log σ(1) = log(1 + e^{−1}) = 0.3132616875;
    rewards: 0.5·(−1 + 2) = 0.5 and 0.5·(−3 + 2) = −0.5."""
    losses, cr, rr = fa.dpo_loss(*PAIR, beta=0.5)
    assert losses.item() == pytest.approx(0.3132616875182228, abs=1e-7)
    assert cr.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)


@pytest.mark.parametrize("loss_type,kw,expected,why", [
    ("ipo_sum", dict(beta=0.5), 1.0, "(Δ − 1/(2β))² = (2 − 1)² = 1"),
    ("hinge", dict(beta=0.5), 0.0, "max(0, 1 − 0.5·2) = 0"),
    ("hinge", dict(beta=0.25), 0.5, "max(0, 1 − 0.25·2) = 0.5"),
    ("cdpo", dict(beta=0.5, label_smoothing=0.1), 0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.exp(1)),
     "0.9·(−log σ(1)) + 0.1·(−log σ(−1)) = 0.9·0.31326 + 0.1·1.31326 = 0.41326"),
    ("robust", dict(beta=0.5, label_smoothing=0.1),
     (0.9 * math.log1p(math.exp(-1)) - 0.1 * math.log1p(math.exp(1))) / 0.8,
     "[0.9·0.31326 − 0.1·1.31326] / 0.8 = 0.18826"),
    # --- the new types (TRL 1.16) ---
    ("sppo_hard", dict(beta=0.25), 2.0, "1/(2β) = 2: (ρ_w − 2)² + (ρ_l + 2)² = (1 − 2)² + (−1 + 2)² = 1 + 1 = 2"),
    ("apo_zero", dict(beta=LN3), 0.5, "1 − σ(ln 3) + σ(−ln 3) = 1 − 3/4 + 1/4 = 0.5"),
    ("apo_down", dict(beta=LN3), 0.85, "σ(ln 3) + 1 − σ(ln 3·2) = 3/4 + 1 − 9/10 = 0.85"),
    ("bco_pair", dict(beta=LN3), 2 * math.log(4 / 3),
     "−log σ(ln 3) − log σ(−(−ln 3)) = 2 log(4/3) = 0.5753641"),
    ("nca_pair", dict(beta=LN3), 1.5 * math.log(4 / 3) + math.log(2.0),
     "−log σ(ln 3) − ½ log σ(−ln 3) − ½ log σ(ln 3) = log(4/3) + ½ log 4 + ½ log(4/3) = 1.1246703"),
    ("exo_pair", dict(beta=LN3 / 2, label_smoothing=0.25), 0.0,
     "βΔ = ln 3: q = (3/4, 1/4) = p_ε = (1 − 0.25, 0.25), so KL(q ‖ p_ε) = 0"),
    ("exo_pair", dict(beta=LN3 / 2, label_smoothing=0.1), 0.75 * math.log(0.75 / 0.9) + 0.25 * math.log(2.5),
     "¾ log(0.75/0.9) + ¼ log(0.25/0.1) = −0.1367412 + 0.2290727 = 0.0923315"),
    ("discopop", dict(beta=LN3 / 2, discopop_tau=LN3), (1 - 1 / (1 + math.exp(-1))) * math.log(4 / 3)
     + 1 / (1 + math.exp(-1)) / 3,
     "x = βΔ = ln 3, m = σ(x/τ) = σ(1) = 0.7310586: (1 − m)·log(4/3) + m·e^{−ln 3} = 0.0773697 + 0.2436862 = 0.3210559"),
])
def test_dpo_variants_by_hand(loss_type, kw, expected, why):
    """The pair above (ρ_w = 1, ρ_l = −1, Δ = 2); the arithmetic is in `why`."""
    losses, _, _ = fa.dpo_loss(*PAIR, loss_type=loss_type, **kw)
    assert losses.item() == pytest.approx(expected, abs=1e-6), why


def test_length_normalised_and_sft_by_hand():
    """Two pairs, |y_w| = (2, 3), |y_l| = (4, 1), β = 0.5.
    ipo (TRL): pair 0: ρ_w/2 − ρ_l/4 = 1/2 + 1/4 = 0.75, (0.75 − 1/(2·0.5))² = (−0.25)² = 0.0625;
               pair 1 (π_w = −4, π_l = −2, refs −2, −2: ρ_w = −2, ρ_l = 0): −2/3 − 0 − 1 = −5/3, (5/3)² = 2.7777778.
    sigmoid_norm: pair 0: −log σ(0.5·0.75) = log(1 + e^{−0.375}) = 0.5245805.
    sft: −(π_w,0 + π_w,1)/(2 + 3) = −(−1 − 4)/5 = 1 in both entries."""
    pc, pr, rc, rr = T([-1.0, -4.0]), T([-3.0, -2.0]), T([-2.0, -2.0]), T([-2.0, -2.0])
    n = dict(chosen_lengths=T([2, 3]), rejected_lengths=T([4, 1]))
    ipo, _, _ = fa.dpo_loss(pc, pr, rc, rr, loss_type="ipo", beta=0.5, **n)
    assert ipo.tolist() == pytest.approx([0.0625, 25 / 9], abs=1e-6)
    norm, _, _ = fa.dpo_loss(pc, pr, rc, rr, loss_type="sigmoid_norm", beta=0.5, **n)
    assert norm[0].item() == pytest.approx(math.log1p(math.exp(-0.375)), abs=1e-6)
    sft, _, _ = fa.dpo_loss(pc, pr, None, None, loss_type="sft", **n)
    assert sft.tolist() == pytest.approx([1.0, 1.0])
    # Means in (average_logps=True): the sum is recovered as mean·|y|: −(−0.5·2 − 4/3·3)/5 = 1.
    sft_mean, _, _ = fa.dpo_loss(pc / T([2, 3]), pr, None, None, loss_type="sft", average_logps=True, **n)
    assert sft_mean.tolist() == pytest.approx([1.0, 1.0])


def test_f_divergences_by_hand():
    """ρ_w = ln 2, ρ_l = −ln 2 (π/π_ref = 2 and 1/2), β = 1, sigmoid:
    forward KL: s = 1 − e^{−ρ}: s_w = 1/2, s_l = −1, Δs = 1.5, loss = log(1 + e^{−1.5}) = 0.2014133;
    JS: s = log 2 + log σ(ρ): s_w = log(4/3), s_l = log(2/3), Δs = log 2, loss = log(1 + 1/2) = 0.4054651;
    α = 0.5: s = (e^{−ρ/2} − 1)/(−1/2) = 2(1 − e^{−ρ/2}): s_w = 2 − √2, s_l = 2 − 2√2, Δs = √2,
    loss = log(1 + e^{−√2}) = 0.2172529;
    reverse KL: Δs = 2 ln 2, loss = log(1 + 1/4) = 0.2231436."""
    pc, pr, rc, rr = T([math.log(2.0)]), T([-math.log(2.0)]), T([0.0]), T([0.0])
    for f, expected in [("forward_kl", math.log1p(math.exp(-1.5))), ("js_divergence", math.log(1.5)),
                        ("alpha_divergence", math.log1p(math.exp(-math.sqrt(2)))), ("reverse_kl", math.log(1.25))]:
        losses, _, _ = fa.dpo_loss(pc, pr, rc, rr, beta=1.0, f_divergence_type=f)
        assert losses.item() == pytest.approx(expected, abs=1e-6), f


def test_multi_loss_and_wpo_by_hand():
    """A weighted sum on the pair above, β = ln 3: 0.8·sigmoid + 0.2·bco_pair + 1.0·apo_zero
    = 0.8·log(1 + e^{−2 ln 3}) + 0.2·2 log(4/3) + 0.5 = 0.8·log(10/9) + 0.1150728 + 0.5 = 0.6993620;
    WPO with log-weights (−0.5, −1): × e^{−1.5} = 0.2231302 → 0.1560489."""
    expected = 0.8 * math.log(10 / 9) + 0.2 * 2 * math.log(4 / 3) + 0.5
    kw = dict(loss_type=["sigmoid", "bco_pair", "apo_zero"], loss_weights=[0.8, 0.2, 1.0], beta=LN3)
    losses, _, _ = fa.dpo_loss(*PAIR, **kw)
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    weighted, _, _ = fa.dpo_loss(*PAIR, use_weighting=True, chosen_wpo_logps=T([-0.5]), rejected_wpo_logps=T([-1.0]),
                                 **kw)
    assert weighted.item() == pytest.approx(expected * math.exp(-1.5), abs=1e-6)


def test_aot_by_hand():
    """Two pairs, β = 1. Policy margins π_w − π_l = (3, −1), reference margins (0, 2): sorted (−1, 3) and (0, 2),
    so δ = (−1 − 0, 3 − 2) = (−1, 1) — pair 1's policy margin meets pair 0's reference margin;
    losses (log(1 + e), log(1 + e^{−1})) = (1.3132617, 0.3132617). Unpaired: ρ_w = (1, −2), ρ_l = (−2, 1)
    sorted (−2, 1) and (−2, 1): δ = (0, 0), losses log 2 each."""
    pc, pr, rc, rr = T([-1.0, -4.0]), T([-4.0, -3.0]), T([-2.0, -2.0]), T([-2.0, -4.0])
    aot, _, _ = fa.dpo_loss(pc, pr, rc, rr, loss_type="aot", beta=1.0)
    assert aot.tolist() == pytest.approx([math.log1p(math.e), math.log1p(1 / math.e)], abs=1e-6)
    unpaired, _, _ = fa.dpo_loss(pc, pr, rc, rr, loss_type="aot_unpaired", beta=1.0)
    assert unpaired.tolist() == pytest.approx([math.log(2.0)] * 2, abs=1e-6)


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


SMOOTHED = {"cdpo": 0.1, "robust": 0.1, "exo_pair": 0.05, "aot": 0.1, "aot_unpaired": 0.2, "simpo": 0.1}


def random_pairs(B=8, seed=0):
    """(B,) float64 sequence log-prob sums with log-ratios of a few nats, and completion lengths."""
    g = torch.Generator().manual_seed(seed)
    pc, pr = (torch.randn(B, generator=g, dtype=torch.float64) * 4 - 30 for _ in range(2))
    rc, rr = pc + torch.randn(B, generator=g, dtype=torch.float64), pr + torch.randn(B, generator=g, dtype=torch.float64)
    n = dict(chosen_lengths=torch.randint(1, 12, (B,), generator=g), rejected_lengths=torch.randint(1, 12, (B,), generator=g))
    return pc.requires_grad_(), pr.requires_grad_(), rc, rr, n


def options_for(loss_type, f="reverse_kl"):
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    return dict(beta=0.3, label_smoothing=max((SMOOTHED.get(t, 0.0) for t in types), default=0.0),
                gamma=0.5 if "simpo" in types else 0.0, discopop_tau=0.2, f_divergence_type=f,
                f_alpha_divergence_coef=0.3)


def assert_matches_reference(loss_type, seed=0, **extra):
    pc, pr, rc, rr, n = random_pairs(seed=seed)
    kw = {**options_for(loss_type), **n, **extra}
    losses, _, _ = fa.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, **kw)
    ref = dpo_loss_reference(pc, pr, rc, rr, loss_type=loss_type, **{k: v for k, v in kw.items() if k != "use_weighting"})
    assert torch.allclose(losses, ref, rtol=1e-12, atol=1e-12), (losses - ref).abs().max()
    w = torch.linspace(0.5, 1.5, len(losses), dtype=torch.float64)  # a non-uniform upstream gradient
    got = torch.autograd.grad((losses * w).sum(), (pc, pr), allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad((ref * w).sum(), (pc, pr), allow_unused=True, materialize_grads=True)
    for a, e in zip(got, want):
        assert torch.allclose(a, e, rtol=1e-10, atol=1e-12), (a - e).abs().max()


@pytest.mark.parametrize("loss_type", sorted(fa.losses.LOSS_TYPES))
def test_every_loss_type_matches_reference_with_grads(loss_type):
    assert_matches_reference(loss_type)


@pytest.mark.parametrize("f", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "cdpo", "robust", "hinge", "ipo", "ipo_sum", "sigmoid_norm",
                                       "exo_pair", "discopop"])
def test_f_divergences_match_reference(loss_type, f):
    assert_matches_reference(loss_type, f_divergence_type=f)


@pytest.mark.parametrize("loss_type", [["sigmoid", "bco_pair", "sft"], ["ipo", "exo_pair", "apo_down"], "hinge"])
def test_multi_loss_and_wpo_match_reference(loss_type):
    g = torch.Generator().manual_seed(3)
    weights = None if isinstance(loss_type, str) else [0.8, 0.2, 1.0]
    wpo = dict(chosen_wpo_logps=-torch.rand(8, generator=g, dtype=torch.float64),
               rejected_wpo_logps=-torch.rand(8, generator=g, dtype=torch.float64))
    assert_matches_reference(loss_type, loss_weights=weights)
    assert_matches_reference(loss_type, loss_weights=weights, use_weighting=True, **wpo)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_batch_sorted_losses_permute_only_the_pair_order(loss_type):
    """Permuting the pairs leaves the per-quantile losses (hence the loss) unchanged and permutes the gradient
    with the pairs; the sort does pair quantiles across pairs (the loss differs from `sigmoid`)."""
    pc, pr, rc, rr, _ = random_pairs(B=7, seed=5)
    kw = dict(loss_type=loss_type, beta=0.7, label_smoothing=0.1)
    losses, cr, rr_ = fa.dpo_loss(pc, pr, rc, rr, **kw)
    gc, gr = torch.autograd.grad(losses.mean(), (pc, pr))
    perm = torch.tensor([3, 0, 6, 2, 5, 1, 4])
    qc, qr = pc.detach()[perm].requires_grad_(), pr.detach()[perm].requires_grad_()
    p_losses, p_cr, p_rr = fa.dpo_loss(qc, qr, rc[perm], rr[perm], **kw)
    hc, hr = torch.autograd.grad(p_losses.mean(), (qc, qr))
    assert torch.equal(p_losses, losses)          # per-quantile entries: the same, in the same order
    assert torch.equal(hc, gc[perm]) and torch.equal(hr, gr[perm])
    assert torch.equal(p_cr, cr[perm]) and torch.equal(p_rr, rr_[perm])  # rewards stay per pair
    paired, _, _ = fa.dpo_loss(pc, pr, rc, rr, **{**kw, "loss_type": "cdpo"})
    assert not torch.allclose(losses.mean(), paired.mean())


def test_readme_lists_every_loss_type():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [t for t in fa.losses.LOSS_TYPES if f"| `{t}`" not in readme]
    assert not missing, f"README's DPO table lacks {missing}"


def test_pair_losses_are_per_pair():
    """Every PAIR_LOSSES entry depends on its own pair only: a sub-batch gives the sub-batch's losses."""
    pc, pr, rc, rr, n = random_pairs(seed=1)
    idx = torch.tensor([5, 1, 2])
    for t in fa.losses.PAIR_LOSSES:
        kw = options_for(t)
        full, _, _ = fa.dpo_loss(pc, pr, rc, rr, loss_type=t, **kw, **n)
        sub, _, _ = fa.dpo_loss(pc[idx], pr[idx], rc[idx], rr[idx], loss_type=t, **kw,
                                **{k: v[idx] for k, v in n.items()})
        assert torch.allclose(full[idx], sub, rtol=1e-12), t


def test_dpo_step0_is_log2():
    lp = torch.randn(5)
    losses, cr, rr = fa.dpo_loss(lp, lp - 1, lp, lp - 1)
    assert torch.allclose(losses, torch.full((5,), math.log(2.0)))
    assert torch.count_nonzero(cr) == 0 and torch.count_nonzero(rr) == 0


def test_dpo_loss_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"loss_type must be one of \['aot', 'aot_unpaired', 'apo_down', .*\] "
                                         r"\(or a list of them\), got 'kto'"):
        fa.dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="one weight per loss type: 1 weights for 2 types"):
        fa.dpo_loss(x, x, x, x, loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="label_smoothing=0.1 is read by none of \\['sigmoid'\\].*'cdpo'"):
        fa.dpo_loss(x, x, x, x, label_smoothing=0.1)
    with pytest.raises(ValueError, match="'exo_pair' needs label_smoothing > 0"):
        fa.dpo_loss(x, x, x, x, loss_type="exo_pair")
    with pytest.raises(ValueError, match="f_divergence_type='forward_kl' applies only to"):
        fa.dpo_loss(x, x, x, x, loss_type="bco_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="f_divergence_type must be one of"):
        fa.dpo_loss(x, x, x, x, f_divergence_type="kl")
    with pytest.raises(ValueError, match="use_weighting .* cannot combine with \\['aot'\\]"):
        fa.dpo_loss(x, x, x, x, loss_type="aot", use_weighting=True, chosen_wpo_logps=x, rejected_wpo_logps=x)
    with pytest.raises(ValueError, match="use_weighting \\(WPO\\) needs chosen_wpo_logps and rejected_wpo_logps"):
        fa.dpo_loss(x, x, x, x, use_weighting=True)
    with pytest.raises(ValueError, match="pass use_weighting=True as well"):
        fa.dpo_loss(x, x, x, x, chosen_wpo_logps=x, rejected_wpo_logps=x)
    with pytest.raises(ValueError, match="needs chosen_lengths and rejected_lengths .*'ipo_sum' is IPO on sums"):
        fa.dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="normalise by completion length themselves"):
        fa.dpo_loss(x, x, x, x, loss_type="ipo", average_logps=True, chosen_lengths=x, rejected_lengths=x)
    with pytest.raises(ValueError, match="discopop_tau must be a finite number > 0"):
        fa.dpo_loss(x, x, x, x, loss_type="discopop", discopop_tau=0.0)
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
    dict(loss_type="cdpo", label_smoothing=0.2, nll_coef=0.5),
    dict(loss_type="robust", label_smoothing=0.1),
    dict(loss_type="hinge", beta=0.5),
    dict(loss_type="ipo"),
    dict(loss_type="ipo_sum", average_logps=True),
    dict(loss_type="simpo", average_logps=True, beta=2.0, gamma=0.5),
    dict(loss_type="sigmoid_norm", f_divergence_type="js_divergence", use_weighting=True),
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], use_weighting=True),
    dict(loss_type="aot_unpaired", label_smoothing=0.1),
]
TRL_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"}


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
    assert set(metrics) == TRL_METRICS | {"nll"}
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
    with pytest.raises(ValueError, match="normalise by completion length themselves"):
        call(loss_type="ipo", average_logps=True, ref_chosen_logps=rc, ref_rejected_logps=rc)
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
