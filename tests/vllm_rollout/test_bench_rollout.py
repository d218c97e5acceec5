"""benchmarks/bench_rollout.py stays runnable: its tiny preset runs both engines and writes well-formed raw JSON."""

import json
import runpy
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_bench_rollout_smoke(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["bench_rollout.py", "--preset", "tiny", "--reps", "1", "--out", str(out)])
    runpy.run_path(str(BENCH / "bench_rollout.py"), run_name="__main__")
    data = json.loads(out.read_text())
    assert {"device", "torch", "vllm", "commit", "date", "preset"} <= set(data["header"])
    (rec,) = data["records"]
    for k in ("hf_tokens_per_s_median", "vllm_tokens_per_s_median", "hf_first_batch_s", "vllm_first_batch_s",
              "vllm_engine_start_s", "vllm_push_s_median"):
        assert rec[k] > 0, k
    assert len(rec["reps"]["hf"]) == len(rec["reps"]["vllm"]) == 1
    assert rec["reps"]["hf"][0]["tokens"] > 0 and rec["reps"]["vllm"][0]["tokens"] > 0
