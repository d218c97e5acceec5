"""Packed (padding-free) and padded batches give the same losses and gradients."""

import pytest
import torch
from helpers import rel_err

from fusealign.engine import task
from fusealign.engine.data import load_examples
from fusealign.engine.models import RewardModel, model_from_config
from fusealign.engine.objectives import dpo_loss, rm_loss, sft_loss

TOK = task.tokenizer()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run(fn, model):
    model.zero_grad()
    loss, metrics, _ = fn(model)
    loss.backward()
    return loss.detach(), metrics, grads(model)


@pytest.mark.parametrize("objective", ["sft", "rm", "dpo", "dpo-online"])
def test_packed_equals_padded(objective):
    pairs, _ = load_examples("builtin:pairs", "pairs", TOK, max_length=48)
    sft, _ = load_examples("builtin:sft", "sft", TOK, max_length=48)
    lm = model_from_config(task.model_config(), seed=0)
    ref = model_from_config(task.model_config(), seed=1)
    model = RewardModel(lm) if objective == "rm" else lm
    ref_logps = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)) - 20

    def fn(pack):
        if objective == "sft":
            return lambda m: sft_loss(m, sft[:8], pad_id=TOK.pad_token_id, pack=pack)
        if objective == "rm":
            return lambda m: rm_loss(m, pairs[:8], pad_id=TOK.pad_token_id, pack=pack, center_coef=0.1)
        kw = dict(ref_model=ref) if objective == "dpo-online" else dict(ref_logps=ref_logps)
        return lambda m: dpo_loss(m, pairs[:8], pad_id=TOK.pad_token_id, pack=pack, beta=0.5, loss_type="sigmoid",
                                  nll_coef=0.1, **kw)

    l1, m1, g1 = run(fn(False), model)
    l2, m2, g2 = run(fn(True), model)
    assert torch.allclose(l1, l2, atol=1e-5), (l1, l2)
    for k in m1:
        assert torch.allclose(torch.as_tensor(m1[k]), torch.as_tensor(m2[k]), atol=1e-4), k
    for n in g1:
        assert rel_err(g2[n], g1[n]) < 1e-4, n
