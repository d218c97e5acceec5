"""Every supported family: fused-head log-probs and gradients equal those of the model's own logits."""

import pytest
import torch
from hf_families import FAMILIES, V, build
from helpers import rel_err

from fusealign.engine.data import collate
from fusealign.engine.models import score_tokens

def batch():
    g = torch.Generator().manual_seed(1)
    seqs = []
    for plen, clen in ((3, 5), (5, 2), (2, 7)):
        seqs.append((torch.randint(1, V, (plen,), generator=g).tolist(), torch.randint(1, V, (clen,), generator=g).tolist()))
    return collate(seqs, pad_id=0, pack=False)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_equals_materialised_logits(family, temperature):
    model = build(family)
    b = batch()
    w = torch.linspace(-1, 1, int((b.targets != -100).sum()))  # non-uniform upstream gradient

    logps = score_tokens(model, b, temperature=temperature, backend="torch").logps
    (logps * w).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    # The model's own path: full logits (its softcap / logit scale inside), then log-softmax and gather.
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    keep = b.targets != -100
    ref = torch.log_softmax(logits.float()[keep] / temperature, -1).gather(1, b.targets[keep][:, None]).squeeze(1)
    (ref * w).sum().backward()
    assert torch.allclose(logps, ref, atol=2e-5), (logps - ref).abs().max()
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        assert n in ours, n
        assert rel_err(ours[n], p.grad) < 1e-4, (n, rel_err(ours[n], p.grad))
