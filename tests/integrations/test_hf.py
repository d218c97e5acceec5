"""fa.patch_model on every supported family: the fused forward equals the float64 materialised-logits computation
(log-probs, the other outputs, the loss and every parameter gradient), and without the flag nothing changes."""

import pytest
import torch
from hf_families import FAMILIES, V, build
from helpers import rel_err

import fusealign as fa
from fusealign.kernels.reference import linear_logps_reference

OUTPUTS = ("logps", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    labels[mask == 0] = -100
    return ids, mask, labels


def materialised(model, ids, mask, labels, temperature):
    """The model's own forward in float64: full logits (its softcap / logit scale inside), then the reference."""
    m64 = model.double()
    logits = m64(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
    eye = torch.eye(V, dtype=torch.float64)  # the reference op on logits: hidden = logits, weight = I
    return linear_logps_reference(logits, eye, labels[:, 1:], temperature=temperature, outputs=OUTPUTS,
                                  dtype=torch.float64)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_patched_forward_equals_materialised_logits(family, temperature):
    model = build(family)
    ids, mask, labels = padded_batch()
    fa.patch_model(model, temperature=temperature, outputs=OUTPUTS, backend="torch")
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_head=True)
    w = torch.linspace(-1, 1, out.logps.numel()).view_as(out.logps)  # non-uniform upstream gradient
    ((out.logps * w).sum() + out.loss).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    ref = materialised(model, ids, mask, labels, temperature)
    valid = labels[:, 1:] != -100
    ref_loss = -ref[0].sum() / valid.sum()
    ((ref[0] * w.double()).sum() + ref_loss).backward()
    assert out.logps.shape == labels[:, 1:].shape and torch.equal(out.label_mask, valid)
    for name, a, e in zip(OUTPUTS[:4], (out.logps, out.entropy, out.log_sum_sq_probs, out.mean_logits), ref):
        assert (a.double() - e).abs().max() < 2e-5, (name, (a.double() - e).abs().max())
    assert (out.is_top1 == ref[4]).float().mean() > 0.95  # fp32 vs fp64 near-ties aside
    assert abs(out.loss.item() - ref_loss.item()) < 2e-5
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        assert n in ours, n
        assert rel_err(ours[n], p.grad) < 1e-4, (n, rel_err(ours[n], p.grad))


@pytest.mark.parametrize("family", ["llama", "gpt2-tied", "gemma3-vlm-nested"])
def test_without_the_flag_forward_and_generate_are_unchanged(family):
    model = build(family)
    ids, mask, _ = padded_batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    gen_before = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    fa.patch_model(model, outputs=("logps", "entropy"))
    fa.patch_model(model)  # patching again replaces the options, it does not wrap twice
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    assert torch.equal(model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0), gen_before)
    out = model(input_ids=ids, attention_mask=mask, labels=ids, fused_head=True)
    assert out.entropy is None and out.logps.shape == (3, 8)
    # the model's own loss (labels shifted inside, mean over tokens) is the fused NLL
    own = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert abs(own.item() - out["loss"].item()) < 1e-5


def test_shift_labels_and_all_ignored_batch():
    model = build("llama")
    ids, mask, labels = padded_batch()
    fa.patch_model(model)
    a = model(input_ids=ids, attention_mask=mask, labels=labels, fused_head=True)
    b = model(input_ids=ids, attention_mask=mask, shift_labels=torch.cat([labels[:, 1:], torch.full_like(labels[:, :1],
                                                                               -100)], 1), fused_head=True)
    assert torch.allclose(a.logps, b.logps[:, :-1]) and torch.allclose(a.loss, b.loss)
    none = model(input_ids=ids, labels=torch.full_like(ids, -100), fused_head=True)
    none.loss.backward()  # differentiable zero: an all-prompt microbatch does not break backward
    assert none.loss.item() == 0.0
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, fused_head=True)
