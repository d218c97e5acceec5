"""Typed option bundles: `fa.DPOOptions` / `fa.PPOOptions` are validated once and mean exactly what the keywords do."""

import dataclasses

import pytest
import torch

import fusealign as fa
from fusealign.kernels import reference as ref


def _pairs(B=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, generator=g, dtype=torch.float64) for _ in range(4)]


def test_dpo_options_equal_keywords_and_replace_fields():
    pc, pr, rc, rr = _pairs()
    kw = dict(beta=0.3, loss_type=["sigmoid", "bco_pair"], loss_weights=[0.7, 0.3])
    by_kw = fa.dpo_loss(pc, pr, rc, rr, **kw)[0]
    opts = fa.DPOOptions(**kw)
    assert opts.loss_type == ("sigmoid", "bco_pair") and opts.loss_weights == (0.7, 0.3)  # normalised once
    assert torch.equal(fa.dpo_loss(pc, pr, rc, rr, options=opts)[0], by_kw)
    # a keyword next to options= replaces that field of the bundle
    replaced = fa.dpo_loss(pc, pr, rc, rr, options=opts, beta=0.6)[0]
    assert torch.equal(replaced, fa.dpo_loss(pc, pr, rc, rr, **{**kw, "beta": 0.6})[0])
    assert not torch.equal(replaced, by_kw)
    assert opts.beta == 0.3  # the bundle itself is frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.beta = 1.0


def test_unknown_keyword_names_the_bundle_fields():
    pc, pr, rc, rr = _pairs()
    with pytest.raises(TypeError, match=r"'betta'.*DPOOptions: .*beta"):
        fa.dpo_loss(pc, pr, rc, rr, betta=0.1)
    with pytest.raises(TypeError, match=r"'clip'.*PPOOptions: .*clip_eps"):
        fa.ppo_policy_loss(pc.view(1, -1), None, pr.view(1, -1), rc.view(1, -1), torch.ones(1, 5, dtype=torch.bool),
                           clip=0.1)
    with pytest.raises(TypeError, match="must be a DPOOptions"):
        fa.dpo_loss(pc, pr, rc, rr, options=fa.PPOOptions())


def test_validation_happens_in_the_bundle():
    with pytest.raises(ValueError, match="beta"):
        fa.DPOOptions(beta=0.0)
    with pytest.raises(ValueError, match="loss_weights must have one weight per loss type"):
        fa.DPOOptions(loss_type=["sigmoid", "ipo"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="nll_coef"):
        fa.DPOOptions(nll_coef=-1.0)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        fa.PPOOptions(dual_clip=0.5)
    with pytest.raises(ValueError, match="loss_agg"):
        fa.PPOOptions(loss_agg="mean")


def test_gamma_is_an_alias_of_simpo_gamma():
    pc, pr, _, _ = _pairs()
    a = fa.dpo_loss(pc, pr, None, None, loss_type="simpo", beta=2.0, gamma=0.5)[0]
    b = fa.dpo_loss(pc, pr, None, None, loss_type="simpo", beta=2.0, simpo_gamma=0.5)[0]
    assert torch.equal(a, b)
    # −log σ(2·(pc − pr) − 0.5), entry by entry
    expected = torch.nn.functional.softplus(-(2.0 * (pc - pr) - 0.5))
    torch.testing.assert_close(a, expected)
    with pytest.raises(TypeError, match="both 'gamma' and 'simpo_gamma'"):
        fa.dpo_loss(pc, pr, None, None, loss_type="simpo", gamma=0.5, simpo_gamma=0.5)
    with pytest.raises(ValueError, match="only used by loss_type='simpo'"):
        fa.DPOOptions(simpo_gamma=0.5)


def test_average_logps_defaults_on_for_simpo_alone():
    assert fa.DPOOptions(loss_type="simpo").per_token_means is True
    assert fa.DPOOptions(loss_type="sigmoid").per_token_means is False
    assert fa.DPOOptions(loss_type=["simpo", "sft"]).per_token_means is False
    assert fa.DPOOptions(loss_type="simpo", average_logps=False).per_token_means is False
    # unset stays unset: a bundle whose loss type is replaced re-decides (as `fusealign dpo --loss-type simpo` does)
    import dataclasses
    assert dataclasses.replace(fa.DPOOptions(beta=0.5), loss_type=["simpo"]).per_token_means is True
    g = torch.Generator().manual_seed(1)
    h, W = torch.randn(4, 6, 8, generator=g), torch.randn(13, 8, generator=g)
    y = torch.randint(0, 13, (4, 6), generator=g)
    y[:, :2] = -100
    auto, _ = fa.linear_dpo_loss(h, W, y, loss_type="simpo", beta=2.0, backend="torch")
    means, _ = fa.linear_dpo_loss(h, W, y, loss_type="simpo", beta=2.0, average_logps=True, backend="torch")
    sums, _ = fa.linear_dpo_loss(h, W, y, loss_type="simpo", beta=2.0, average_logps=False, backend="torch")
    assert torch.equal(auto, means) and not torch.equal(auto, sums)


def test_nll_coef_is_rpo_the_sft_term():
    pc, pr, rc, rr = _pairs()
    n = dict(chosen_lengths=torch.tensor([3, 4, 5, 6, 7]), rejected_lengths=torch.tensor([2, 2, 2, 2, 2]))
    rpo = fa.dpo_loss(pc, pr, rc, rr, nll_coef=0.25, **n)[0]
    listed = fa.dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.25], **n)[0]
    torch.testing.assert_close(rpo, listed)
    assert fa.DPOOptions(nll_coef=0.25).terms == (("sigmoid", 1.0), ("sft", 0.25))


def test_references_and_modules_take_the_bundles():
    pc, pr, rc, rr = _pairs()
    opts = fa.DPOOptions(beta=0.4, loss_type="ipo_sum")
    torch.testing.assert_close(ref.dpo_loss_reference(pc, pr, rc, rr, options=opts),
                               fa.dpo_loss(pc, pr, rc, rr, options=opts)[0])
    simpo = fa.DPOOptions(loss_type="simpo", beta=2.0, simpo_gamma=0.3)
    torch.testing.assert_close(ref.dpo_loss_reference(pc, pr, None, None, options=simpo),
                               fa.dpo_loss(pc, pr, None, None, options=simpo)[0])
    g = torch.Generator().manual_seed(2)
    lp, old = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    adv, mask = torch.randn(2, generator=g, dtype=torch.float64), torch.ones(2, 5, dtype=torch.bool)
    popts = fa.PPOOptions(clip_eps=0.1, clip_eps_high=0.3, loss_agg="seq-mean-token-sum")
    torch.testing.assert_close(ref.ppo_policy_loss_reference(lp, None, old, adv, mask, options=popts),
                               fa.ppo_policy_loss(lp, None, old, adv, mask, options=popts)[0])
    module = fa.LinearDPOLoss(beta=0.4, loss_type="ipo_sum")
    assert module.options["options"] == opts
    assert fa.LinearPPOLoss(options=popts).options["options"] == popts
