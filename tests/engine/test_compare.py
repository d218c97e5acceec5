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


def _compare(out, *extra):
    return subprocess.run([sys.executable, "-m", "fusealign", "compare", "--preset", "smoke", "--output-dir", str(out),
                           "--device", "cpu", *extra], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke preset (2 seeds, every row kind) run once; moved aside so a second run can use the same path."""
    base = tmp_path_factory.mktemp("compare")
    r = _compare(base / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    (base / "run").rename(base / "first")
    return base, r.stdout


def test_compare_smoke_rows_intervals_report(smoke):
    base, stdout = smoke
    report = json.loads((base / "first" / "compare.json").read_text())
    assert report["seeds"] == [0, 1]
    rows = {(row["method"], row["setting"]): row for row in report["rows"]}
    methods = {("SFT", "in"), ("PPO", "in"), ("GRPO", "in"), ("DPO", "in"), ("DPO-onpolicy", "in"),
               ("DPO-iterative", "in"), ("PPO", "ood"), ("DPO", "ood"), ("DPO-onpolicy", "ood"), ("DPO-iterative", "ood")}
    assert methods <= set(rows)
    for row in report["rows"]:  # every metric: per-seed values, their mean and a 95 % t-interval (2 seeds: t = 12.71)
        for m in ("gt_reward", "kl_to_sft", "win_rate_vs_sft"):
            iv = row[m]
            assert len(iv["values"]) == 2 and iv["mean"] == pytest.approx(sum(iv["values"]) / 2)
            assert iv["ci"] == pytest.approx(12.7062047 * abs(iv["values"][0] - iv["values"][1]) / 2, rel=1e-6)
    assert rows[("GRPO", "in")]["loss_type"] == "bnpo" and rows[("PPO", "in")]["loss_type"] is None
    sft = rows[("SFT", "in")]
    # The SFT policy against itself: exact KL 0; its fresh samples against the SFT samples: a coin flip
    # (48 prompts per seed: standard error ≈ 0.07, so [0.25, 0.75] is > 3 s.e.).
    assert sft["kl_to_sft"]["values"] == [0.0, 0.0]
    assert all(0.25 <= w <= 0.75 for w in sft["win_rate_vs_sft"]["values"])
    for key in methods - {("SFT", "in")}:
        assert min(rows[key]["kl_to_sft"]["values"]) > 1e-3, key  # trained policies moved away from SFT
    # the per-seed rows behind the intervals, and the paired differences computed from them
    per_seed = report["per_seed"]
    assert set(per_seed) == {"0", "1"} and all(len(v) == len(report["rows"]) for v in per_seed.values())
    diffs = {(d["method"], d["setting"]): d for d in report["differences"]}
    assert set(diffs) == methods - {("SFT", "in"), ("PPO", "in"), ("PPO", "ood")}
    for d in diffs.values():
        assert (d["ppo_minus"] is None) == bool(d["beyond_ppo_kl_in_seeds"])
    png = (base / "first" / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (base / "first" / "report.md").read_text()
    assert "## Findings" in md and "![reward vs KL](frontier.png)" in md and "| DPO-iterative |" in md
    assert "| GRPO | in | KL coef 0.05, bnpo loss |" in md  # the GRPO row states its loss type
    findings = md.split("## Findings")[1].split("## Results")[0]
    assert findings.count("\n- ") == 3  # three generated sentences
    assert "gt reward" in stdout


def test_compare_same_command_twice_is_byte_identical(smoke):
    """Determinism: the same command again (same output path, fresh) writes the same compare.json, byte for byte,
    apart from its `timing` section (wall times, throughput)."""
    base, _ = smoke
    r = _compare(base / "run")
    assert r.returncode == 0, r.stderr[-3000:]

    def without_timing(path):  # the raw bytes before the last key, "timing"
        text = path.read_bytes()
        head, sep, tail = text.rpartition(b'\n "timing": ')
        assert sep and b"wall_s" not in head and list(json.loads(text))[-1] == "timing"
        return head

    assert without_timing(base / "run" / "compare.json") == without_timing(base / "first" / "compare.json")


def test_readme_compare_section_is_the_generated_report():
    """The README shows the committed default-preset report, regenerated from compare.json, never typed by hand."""
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    tables = runpy.run_path(str(root / "scripts" / "readme_tables.py"))
    readme = (root / "README.md").read_text()
    section = readme[readme.index("<!-- compare:begin -->") + len("<!-- compare:begin -->"):
                     readme.index("<!-- compare:end -->")]
    assert section == "\n" + tables["compare_section"]()
    report = json.loads((root / "benchmarks" / "results" / "compare" / "compare.json").read_text())
    assert report["config"]["preset"] == "default" and len(report["seeds"]) >= 3
