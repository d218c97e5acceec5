"""Packed (padding-free) and padded batches give the same losses and gradients."""

import pytest
import torch
from helpers import rel_err

from fusealign.engine.study import task
from fusealign.engine.data import load_examples
from fusealign.engine.models import RewardModel, model_from_config
from fusealign.engine.objectives import dpo_objective, rm_objective, sft_objective
from fusealign.losses import DPOOptions

TOK = task.tokenizer()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run(fn, model):
    model.zero_grad()
    loss, metrics, *_ = fn(model)
    loss.backward()
    return loss.detach(), metrics, grads(model)


@pytest.mark.parametrize("objective", ["sft", "rm", "dpo", "dpo-online", "dpo-mpo-wpo"])
def test_packed_equals_padded(objective):
    pairs, _ = load_examples("builtin:pairs", "pairs", TOK, max_length=48)
    sft, _ = load_examples("builtin:sft", "sft", TOK, max_length=48)
    lm = model_from_config(task.model_config(), seed=0)
    ref = model_from_config(task.model_config(), seed=1)
    model = RewardModel(lm) if objective == "rm" else lm
    ref_logps = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)) - 20

    def fn(pack):
        if objective == "sft":
            return lambda m: sft_objective(m, sft[:8], pad_id=TOK.pad_token_id, pack=pack)
        if objective == "rm":
            return lambda m: rm_objective(m, pairs[:8], pad_id=TOK.pad_token_id, pack=pack, center_coef=0.1)
        kw = dict(ref_model=ref) if objective == "dpo-online" else dict(ref_logps=ref_logps)
        options = dict(beta=0.5, loss_type="sigmoid", nll_coef=0.1)
        if objective == "dpo-mpo-wpo":  # several losses and WPO weights from the packed fused pass
            options.update(loss_type=["sigmoid", "bco_pair", "sft", "ipo"], loss_weights=[0.8, 0.2, 1.0, 0.1],
                           use_weighting=True)
        return lambda m: dpo_objective(m, pairs[:8], pad_id=TOK.pad_token_id, pack=pack,
                                       options=DPOOptions(**options), **kw)

    l1, m1, g1 = run(fn(False), model)
    l2, m2, g2 = run(fn(True), model)
    assert torch.allclose(l1, l2, atol=1e-5), (l1, l2)
    for k in m1:
        assert torch.allclose(torch.as_tensor(m1[k]), torch.as_tensor(m2[k]), atol=1e-4), k
    for n in g1:
        assert rel_err(g2[n], g1[n]) < 1e-4, n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_packed_equals_padded_on_cuda_bf16(attn):
    """On the GPU, packed batches go through the attention kernels' varlen path (position_ids restarting per
    sequence): the DPO loss must match the padded batch's under bf16 autocast."""
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    pairs, _ = load_examples("builtin:pairs", "pairs", TOK, max_length=48)
    config = task.model_config()
    config._attn_implementation = attn
    model = model_from_config(config, seed=0).cuda()
    ref_logps = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)).cuda() - 20

    def fn(pack):
        return lambda m: dpo_objective(m, pairs[:8], pad_id=TOK.pad_token_id, pack=pack,
                                       options=DPOOptions(beta=0.5), ref_logps=ref_logps)

    with torch.autocast("cuda", dtype=torch.bfloat16):
        l1, _, g1 = run(fn(False), model)
        l2, _, g2 = run(fn(True), model)
    assert torch.allclose(l1.float(), l2.float(), atol=2e-2), (l1, l2)
    assert rel_err(g2["lm_head.weight"], g1["lm_head.weight"]) < 5e-2
