"""The nn.Module wrappers take exactly their functions' keyword options, and compute the same thing."""

import inspect

import pytest
import torch

import fusealign as fa
from fusealign.modules import FUNCTIONS


@pytest.mark.parametrize("module", list(FUNCTIONS), ids=lambda m: m.__name__)
def test_module_options_equal_function_options(module):
    fn, per_call = FUNCTIONS[module]
    fn_opts = {n: p.default for n, p in inspect.signature(fn).parameters.items()
               if p.kind is p.KEYWORD_ONLY and n not in per_call}
    mod_opts = {n: p.default for n, p in inspect.signature(module.__init__).parameters.items()
                if p.kind is p.KEYWORD_ONLY}
    assert mod_opts == fn_opts, (f"{module.__name__} drifted from {fn.__name__}: missing "
                                 f"{sorted(set(fn_opts) - set(mod_opts))}, extra {sorted(set(mod_opts) - set(fn_opts))}")
    assert per_call <= set(inspect.signature(fn).parameters), per_call - set(inspect.signature(fn).parameters)


def test_modules_compute_their_functions():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 4, 8, generator=g), torch.randn(11, 8, generator=g)
    b = torch.randn(11, generator=g)
    y = torch.randint(0, 11, (2, 4), generator=g)
    opts = dict(temperature=0.7, softcap=5.0, backend="torch", chunk_bytes=4096)
    assert torch.equal(fa.LinearLogps(**opts)(h, w, y, bias=b), fa.linear_logps(h, w, y, bias=b, **opts))
    hr = torch.randn(2, 4, 8, generator=g)
    assert torch.equal(fa.LinearKL(**opts)(h, w, hr, w, bias=b, ref_bias=b),
                       fa.linear_kl(h, w, hr, w, bias=b, ref_bias=b, **opts))
    rc, rr = torch.randn(1, generator=g), torch.randn(1, generator=g)
    l1, _ = fa.LinearDPOLoss(beta=0.3, **opts)(h, w, y, ref_chosen_logps=rc, ref_rejected_logps=rr, bias=b)
    l2, _ = fa.linear_dpo_loss(h, w, y, ref_chosen_logps=rc, ref_rejected_logps=rr, bias=b, beta=0.3, **opts)
    assert torch.equal(l1, l2)
    old, adv = torch.randn(2, 4, generator=g), torch.randn(2, generator=g)
    l1, _ = fa.LinearPPOLoss(clip_eps=0.1, **opts)(h, w, y, old, adv, bias=b)
    l2, _ = fa.linear_ppo_loss(h, w, y, old, adv, bias=b, clip_eps=0.1, **opts)
    assert torch.equal(l1, l2)
    grpo = dict(loss_type="grpo", beta=0.1, epsilon_high=0.28)
    l1, _ = fa.LinearGRPOLoss(**grpo, **opts)(h, w, y, old, adv, ref_logps=old, bias=b)
    l2, _ = fa.linear_grpo_loss(h, w, y, old, adv, ref_logps=old, bias=b, **grpo, **opts)
    assert torch.equal(l1, l2)
    with pytest.raises(ValueError, match="loss_type must be one of"):  # validated once, at construction
        fa.LinearGRPOLoss(loss_type="ppo")
