"""The benchmark drivers stay runnable: their CPU smoke shapes run and write well-formed raw JSON."""

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
KEYS = {"op", "impl", "mode", "N", "H", "V", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mem_bytes"}


@pytest.mark.parametrize("script", ["bench_logps.py", "bench_dpo.py", "bench_kl.py", "bench_train.py", "bench_ppo.py",
                                    "bench_cpu.py"])
def test_benchmark_smoke(script, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    # bench_cpu: its default is the full CPU grid, on 2 threads; the smoke check runs on the suite's one thread (a
    # 2-thread pool beside the other xdist worker spins in OpenMP's barrier)
    smoke = ["--smoke", "--threads", "1"] if script == "bench_cpu.py" else []
    monkeypatch.setattr(sys, "argv", [script, "--device", "cpu", "--out", str(out)] + smoke)
    runpy.run_path(str(BENCH / script), run_name="__main__")
    data = json.loads(out.read_text())
    assert {"device", "driver", "torch", "triton", "commit", "date"} <= set(data["header"])
    recs = data["records"]
    keys = {"op", "impl", "N", "H", "V", "median_ms", "tokens_per_s"} if script in ("bench_train.py", "bench_ppo.py") else KEYS
    assert recs and all(keys <= set(r) for r in recs if "error" not in r)  # a missing peer is recorded, not fatal
    ours = [r for r in recs if r["impl"] == "fusealign"]
    assert ours and all(r["median_ms"] and r["median_ms"] > 0 for r in ours)
    if script == "bench_cpu.py":  # correctness beside every time, peak memory from its own process
        assert all(r["errors"] for r in ours) and all(r["ratio"] for r in ours)
        assert data["memory"] and all(m["peak_mem_bytes"] is not None for m in data["memory"])


def test_readme_cpu_table_is_generated_from_the_committed_json():
    """The README's CPU table is cpu_table() of benchmarks/results/cpu/cpu.json (scripts/readme_tables.py),
    never typed by hand; the JSON names its machine, versions and commit."""
    root = BENCH.parent
    tables = runpy.run_path(str(root / "scripts" / "readme_tables.py"))
    readme = (root / "README.md").read_text()
    begin, end = "<!-- cpu-bench:begin -->", "<!-- cpu-bench:end -->"
    assert readme[readme.index(begin) + len(begin):readme.index(end)] == "\n" + tables["cpu_section"]()
    data = json.loads((BENCH / "results" / "cpu" / "cpu.json").read_text())
    assert data["header"]["commit"] and data["header"]["cpu_model"] and data["header"]["versions"]
    assert {(r["N"], r["H"], r["V"]) for r in data["records"] if r["op"] == "logps"} >= {
        (512, 512, 32000), (2048, 1024, 32000), (1024, 1024, 128256)}
