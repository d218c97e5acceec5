"""Shared benchmark plumbing: timing, peak memory, the raw-results header, the ratio table.

Raw results are JSON: {"header": {device, driver, torch, triton, commit, date, ...}, "records": [...]},
one record per measurement with op, impl, mode, N, H, V, dtype, median_ms, p20_ms, p80_ms and
peak_mem_bytes (peak allocated during the call above what was allocated before it: inputs excluded,
outputs and gradients included). Every ratio in a report can be recomputed from these files.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def header(driver: str, device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": name,
        "driver": driver,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
    }


def measure(fn, device: str, *, reps: int = 5, rep_ms: int = 200):
    """(median_ms, p20_ms, p80_ms, peak_mem_bytes or None) of `fn()`."""
    if device == "cuda":
        import triton.testing

        fn()  # compile / autotune outside the timed region
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        med, p20, p80 = triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms,
                                                quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80, peak
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return statistics.median(times), q[0], q[3], None


def record(fn, device: str, label: str, **fields) -> dict:
    """Measure `fn` into a raw record; an OOM, a missing or incompatible peer becomes `error`, not a crash."""
    rec = dict(median_ms=None, p20_ms=None, p80_ms=None, peak_mem_bytes=None, **fields)
    try:
        med, p20, p80, peak = measure(fn, device)
        rec.update(median_ms=med, p20_ms=p20, p80_ms=p80, peak_mem_bytes=peak)
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    print(f"{label}: " + (f"{rec['median_ms']:.3f} ms" if rec["median_ms"] else rec["error"]), flush=True)
    emit(dict(kind="bench", **rec))
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rec


def write(path: Path, head: dict, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"header": head, "records": records}, indent=1))
    tmp.replace(path)
    return path


def ratio_table(records: list, baseline: str = "matmul", ours: str = "fusealign") -> str:
    """One line per (op, mode, shape, dtype): our time, ratio to `baseline`, speed-up over each peer."""
    key = lambda r: (r["op"], r["mode"], r.get("entropy", False), r["N"], r["H"], r["V"], r["dtype"])  # noqa: E731
    groups = {}
    for r in records:
        if r.get("median_ms") is not None:
            groups.setdefault(key(r), {})[r["impl"]] = r
    lines = [f"{'op':6} {'mode':8} {'ent':3} {'N':>6} {'H':>5} {'V':>7} {'dtype':8} {'ours ms':>9} "
             f"{'/' + baseline:>8} {'mem MiB':>8}  speed-up vs peers (x, >1 = ours faster; mem ratio)"]
    for k, impls in sorted(groups.items(), key=lambda kv: kv[0]):
        if ours not in impls:
            continue
        o = impls[ours]
        base = impls.get(baseline)
        rb = f"{o['median_ms'] / base['median_ms']:.2f}" if base else "-"
        mem = f"{o['peak_mem_bytes'] / 2**20:.0f}" if o.get("peak_mem_bytes") is not None else "-"
        peers = []
        for name, r in sorted(impls.items()):
            if name in (ours, baseline):
                continue
            s = f"{name} {r['median_ms'] / o['median_ms']:.2f}x"
            if r.get("peak_mem_bytes") and o.get("peak_mem_bytes"):
                s += f" (mem {r['peak_mem_bytes'] / o['peak_mem_bytes']:.1f}x)"
            peers.append(s)
        op, mode, ent, N, H, V, dt = k
        lines.append(f"{op:6} {mode:8} {'y' if ent else 'n':3} {N:>6} {H:>5} {V:>7} {dt:8} {o['median_ms']:>9.3f} "
                     f"{rb:>8} {mem:>8}  " + ", ".join(peers))
    return "\n".join(lines)


def emit(rec: dict, path=None) -> dict:
    """Append one record as a JSON line to `path` (default $SUITE_RECORDS) and flush it to disk at once, so a
    run killed at its time limit still returns every record measured before (benchmarks/gpu_suite.sh)."""
    path = path or os.environ.get("SUITE_RECORDS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return rec
