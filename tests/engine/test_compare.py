"""`fusealign compare`: its exact KL-to-reference against materialised logits, and the smoke preset end to end."""

import json
import subprocess
import sys

import pytest
import torch
import transformers

from fusealign.engine.study.compare import kl_to_reference
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
    """The smoke preset (2 seeds, every row kind) run once; moved aside so a second run can use the same path.
    --seeds 0-1: the preset's own seeds, written as a range."""
    base = tmp_path_factory.mktemp("compare")
    r = _compare(base / "run", "--seeds", "0-1")
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
    findings = md.split("## Findings")[1].split("## The seed document's claims")[0]
    assert findings.count("\n- ") == 3  # three generated sentences
    claims = md.split("## The seed document's claims")[1].split("## Results")[0]
    assert claims.count("\n- **") == 3 and "How a verdict is decided" in claims
    assert "| resolved at 2 seeds | seeds to resolve |" in md
    # the new keys (additive): per difference its resolution, checked against its definition with the t table of
    # test_stats (the smallest n with t(0.975, n − 1)·s/√n < |mean|; ≈ 0 when |mean| ≤ s/√2), and the claims
    from fusealign.engine.study.stats import t_quantile

    for d in report["differences"]:
        res, iv = d["resolution"], d["ppo_minus"]
        if iv is None:
            assert res is None
            continue
        a, b = iv["values"]
        assert res["sd"] == pytest.approx(abs(a - b) / 2 ** 0.5)
        assert res["resolved"] == (abs(iv["mean"]) > iv["ci"])
        if abs(iv["mean"]) <= res["sd"] / 2 ** 0.5:
            assert res["note"] == "not resolvable: mean ≈ 0" and res["seeds_needed"] is None
        else:
            k = res["seeds_needed"]
            assert t_quantile(0.975, k - 1) * res["sd"] / k ** 0.5 < abs(iv["mean"])
            assert k == 2 or t_quantile(0.975, k - 2) * res["sd"] / (k - 1) ** 0.5 >= abs(iv["mean"])
    assert set(report["claims"]) == {"ppo_beats_dpo", "dpo_degrades_ood", "onpolicy_closes_gap"}
    assert all(c["verdict"] in ("supports", "contradicts", "mixed", "cannot tell") for c in report["claims"].values())
    assert "gt reward" in stdout and "seeds to resolve" in stdout and "**PPO beats DPO**" in stdout


def test_compare_same_command_twice_is_byte_identical(smoke):
    """Determinism: the same command again (same output path, fresh) writes the same compare.json, byte for byte,
    apart from its `timing` section (wall times, throughput)."""
    base, _ = smoke
    r = _compare(base / "run", "--seeds", "0-1")
    assert r.returncode == 0, r.stderr[-3000:]

    def without_timing(path):  # the raw bytes before the last key, "timing"
        text = path.read_bytes()
        head, sep, tail = text.rpartition(b'\n "timing": ')
        assert sep and b"wall_s" not in head and list(json.loads(text))[-1] == "timing"
        return head

    assert without_timing(base / "run" / "compare.json") == without_timing(base / "first" / "compare.json")


def test_seeds_lists_and_ranges():
    """--seeds: "0-9" is ten seeds, "0,2,5-7" five, in the order written; bad lists fail with the item named."""
    from fusealign.engine.study.config import CompareConfig, parse_seeds

    assert parse_seeds("0-9") == tuple(range(10))
    assert parse_seeds("0,2,5-7") == (0, 2, 5, 6, 7)
    assert parse_seeds(" 3, 1-2 ") == (3, 1, 2) and parse_seeds("4-4") == (4,) and parse_seeds("") == ()
    bad = {"9-0": "range '9-0' is reversed; write it low-high: 0-9",
           "0-3,2": "seed 2 is listed twice ('0-3' and '2')",
           "1,1": "seed 1 is listed twice",
           "-1": "'-1' is negative", "0,-2-3": "'-2-3' is negative",
           "a": "'a' is not a seed or a range", "1-2-3": "'1-2-3' is not", "1,,2": "'' is not", "0,1,": "'' is not",
           "1.5": "'1.5' is not", "0x3": "'0x3' is not", "+1": "'+1' is not", "٣": "'٣' is not",
           "0-5000": "holds 5001 seeds; at most 1000"}
    for text, fragment in bad.items():
        with pytest.raises(ValueError, match="^--seeds") as e:
            parse_seeds(text)
        assert fragment in str(e.value), (text, str(e.value))
        with pytest.raises(ValueError):
            CompareConfig(seeds=text)
    assert CompareConfig(seeds="0-2").seeds == "0-2"
    from fusealign.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["compare"]
    assert "0-9" in sub.format_help() and "0,2,5-7" in sub.format_help()


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
    study = root / "benchmarks" / "results" / "compare-10seeds"
    if (study / "compare.json").exists():  # the seed study, once committed: 10 seeds of the default preset
        r10 = json.loads((study / "compare.json").read_text())
        assert r10["config"]["preset"] == "default" and r10["seeds"] == list(range(10))
        from fusealign.engine.study.report import report_markdown

        assert (study / "report.md").read_text() == report_markdown(r10)  # re-rendered by the current code
        assert f"### PPO or DPO? `fusealign compare --preset default --seeds {r10['config']['seeds']}`" in section
    else:
        assert "Not committed yet: `benchmarks/results/compare-10seeds/`" in section


def test_readme_study_block_from_a_second_result_directory(tmp_path):
    """The seed study's block comes from its own directory's compare.json: findings, claims, the differences
    with seeds to resolve and its plot, but not the table of every row (its report.md has it); the 3-seed quick
    check follows in full."""
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    tables = runpy.run_path(str(root / "scripts" / "readme_tables.py"))
    r = json.loads((root / "benchmarks" / "results" / "compare" / "compare.json").read_text())
    r["config"]["seeds"] = "0-2"  # stands in for the 10-seed run's --seeds 0-9
    (tmp_path / "compare.json").write_text(json.dumps(r))
    section = tables["compare_section"](study_dir=tmp_path)
    study, quick = section.split("### Quick check: the main job, `fusealign compare --preset default` (3 seeds)")
    assert study.startswith("### PPO or DPO? `fusealign compare --preset default --seeds 0-2`")
    for part in ("#### Findings", "#### The seed document's claims", "How a verdict is decided",
                 "#### PPO − X at matched KL", "| seeds to resolve |", "frontier.png)", "/report.md)"):
        assert part in study, part
    assert "#### Results" not in study and "#### Results" in quick and "| seeds to resolve |" in quick
    assert "benchmarks/results/compare/frontier.png" in quick
