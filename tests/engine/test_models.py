"""Every supported family: fused-head log-probs and gradients equal those of the model's own logits."""

import pytest
import torch
import transformers
from helpers import rel_err

from fusealign.engine.data import collate
from fusealign.engine.models import head_of
from fusealign.engine.models import score_tokens

V, H = 97, 32
COMMON = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": ("LlamaConfig", COMMON),
    "qwen2": ("Qwen2Config", COMMON),
    "qwen3": ("Qwen3Config", {**COMMON, "head_dim": 8}),
    "mistral": ("MistralConfig", COMMON),
    "gemma2-softcap": ("Gemma2Config", {**COMMON, "head_dim": 8, "final_logit_softcapping": 2.0}),
    "gemma3-softcap": ("Gemma3TextConfig", {**COMMON, "head_dim": 8, "final_logit_softcapping": 3.0}),
    "gpt2-tied": ("GPT2Config", dict(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=64)),
    "phi-bias-generic": ("PhiConfig", COMMON),  # no special case: get_decoder/get_output_embeddings, head bias
    "cohere-logit-scale": ("CohereConfig", {**COMMON, "logit_scale": 0.5}),
}


def build(family):
    cls_name, kw = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()  # no dropout: two runs compared
    if family == "gemma3-softcap":  # from_config may map a text config to the causal LM; make the head non-trivial
        assert head_of(model).softcap == 3.0
    return model


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
