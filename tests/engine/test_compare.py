"""`fusealign compare`: its exact KL-to-reference against materialised logits, and the smoke preset end to end."""

import json
import subprocess
import sys

import pytest
import torch
import transformers

from fusealign.engine.compare import kl_to_reference
from fusealign.engine.data import collate

V, H = 53, 32
COMMON = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
HEADS = {
    "gemma2-softcap": ("Gemma2Config", {**COMMON, "head_dim": 8, "final_logit_softcapping": 1.5}),
    "phi-bias": ("PhiConfig", COMMON),
    "cohere-logit-scale": ("CohereConfig", {**COMMON, "logit_scale": 0.25}),
}


def model(family, seed):
    cls, kw = HEADS[family]
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw), dtype=torch.float32).eval()
    if family == "phi-bias":  # a non-zero head bias, different per model
        with torch.no_grad():
            m.get_output_embeddings().bias.normal_(0, 2.0)
    return m


@pytest.mark.parametrize("family", list(HEADS))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kl_to_reference_equals_materialised_kl(family, backend):
    """The drift bug of issue 10: compare's KL ignored the head's softcap, logit scale and bias. Reference: the
    models' own logits (their softcap / scale / bias inside), log-softmax, Σ_v p (log p − log q) per position."""
    policy, ref = model(family, 0), model(family, 1)
    g = torch.Generator().manual_seed(2)
    seqs = [(torch.randint(1, V, (p,), generator=g).tolist(), torch.randint(1, V, (c,), generator=g).tolist())
            for p, c in ((3, 5), (4, 2), (2, 6))]
    batch = collate(seqs, pad_id=0, pack=False)
    with torch.no_grad():
        ours = kl_to_reference(policy, ref, batch, backend=backend)
        keep = batch.targets != -100
        lp = torch.log_softmax(policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double(), -1)
        lq = torch.log_softmax(ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double(), -1)
        per_pos = (lp.exp() * (lp - lq)).sum(-1)  # (S, L)
        expected = torch.where(keep, per_pos, 0.0).sum(-1)
    assert ours.shape == (3,)
    assert torch.allclose(ours.double(), expected, rtol=1e-4, atol=1e-5), (ours, expected)
    assert (expected > 1e-3).all()


def test_compare_smoke_writes_json_plot_and_consistent_rows(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fusealign", "compare", "--preset", "smoke", "--output-dir",
                        str(tmp_path), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "compare.json").read_text())
    rows = {(row["method"], row["setting"]): row for row in report["rows"]}
    assert {("SFT", "in"), ("PPO", "in"), ("DPO", "in"), ("PPO", "ood"), ("DPO", "ood")} <= set(rows)
    sft = rows[("SFT", "in")]
    # The SFT policy against itself: exact KL 0; its fresh samples against the SFT samples: a coin flip
    # (48 prompts: standard error ≈ 0.07, so [0.25, 0.75] is > 3 s.e.).
    assert abs(sft["kl_to_sft"]) < 1e-4
    assert 0.25 <= sft["win_rate_vs_sft"] <= 0.75
    for key in (("PPO", "in"), ("DPO", "in"), ("PPO", "ood"), ("DPO", "ood")):
        assert rows[key]["kl_to_sft"] > 1e-3, key  # trained policies moved away from SFT
    png = (tmp_path / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "gt reward" in r.stdout
