"""benchmarks/gpu_suite.sh runs end to end on the CPU (--dry-run), so the one GPU call cannot fail on a typo.

The dry run is the same script: the same set-up (the package mapped as setup.py does, imported from the
copy), every stage in order under its timeout, records appended to $OUT/records.jsonl as they are measured,
the selection table written — on tiny shapes, under the Triton interpreter, without the CUDA-only peers.
About 60–90 s on two idle cores (mostly Python start-ups and the interpreter); the step limits are ×4 in the dry run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["setup", "a1_gpu_tests", "a2_kernel_tests", "b_candidates", "c_select", "d_train", "e_rest",
          "f_rollout"]


@pytest.mark.ci_step  # 60–130 s: its own step of .ci/run, beside the README's test command
def test_gpu_suite_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, TRITON_INTERPRET="1")
    env.pop("SUITE_RECORDS", None)
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    steps = {r["step"]: r["rc"] for r in records if r.get("kind") == "step"}
    assert list(steps) == STAGES, steps
    assert all(rc == 0 for rc in steps.values()), steps
    # The mapped copy is what ran, not the editable install.
    assert str(out / "pkg" / "fusealign") in log
    bench = [r for r in records if r.get("kind") == "bench"]
    impls = {r["impl"] for r in bench if r.get("op") == "logps"}
    assert {"cublas", "triton_bare", "fa:fused", "fa:persistent", "fa:hybrid", "trl"} <= impls, impls
    assert all(r.get("median_ms") for r in bench if r["impl"].startswith("fa")), [r for r in bench if "error" in r]
    assert all(r.get("ok") and r.get("invariant") for r in bench if r["impl"].startswith("fa:")), bench
    assert {r["impl"] for r in bench if r.get("op") == "kl"} >= {"fa_kl:fused", "fa_kl:persistent"}
    assert any(r.get("op") == "dpo_step" and r.get("tokens_per_s") for r in bench)
    (roll,) = [r for r in bench if r.get("op") == "rollout"]  # HF generate alone: no vLLM in the dry run
    assert roll["engines"] == ["hf"] and roll["hf_tokens_per_s_median"] > 0 and roll["hf_first_batch_s"] > 0
    table = json.loads((out / "tuned.json").read_text())
    assert table["version"] == 1 and table["entries"] == {}  # a CPU run never makes an entry
