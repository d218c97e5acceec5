"""The README's CPU table, rendered from bench_cpu.py's raw JSON (never typed by hand).

    python benchmarks/cpu_table.py [benchmarks/results/cpu/cpu.json]

`cpu_table(data)` -> markdown: per shape, each implementation's median time as a multiple of the bare
matmul's median in the same run (the spread, min–max over the interleaved repeats, in brackets), the max
error against float64 beside it, then the peak memory of forward + backward, each implementation in its own
process. scripts/readme_tables.py puts it between the README's `<!-- cpu-bench:begin/end -->` markers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ("matmul", "naive", "fusealign", "fusealign_recompute", "cce", "trl", "torch_lce")
LABEL = dict(matmul="bare head matmul(s)", naive="naive `log_softmax(h @ Wᵀ)` (fp32)",
             fusealign="**fusealign** `backend=\"torch\"`",
             fusealign_recompute="fusealign, `chunk_bytes` = half the tile (recomputes)", cce="Cut Cross-Entropy `impl=\"torch_compile\"`",
             trl="TRL `ChunkedLogProbFunction`", torch_lce="`torch.nn.functional.linear_cross_entropy`")
KL_LABEL = dict(matmul="bare head matmuls (both heads)", naive="naive two-head KL (fp32)",
                fusealign="**fusealign** `linear_kl`, `backend=\"torch\"`",
                fusealign_recompute="fusealign `linear_kl`, `chunk_bytes` = half the tiles (recomputes)")
COLUMNS = (("fwd", False, "forward"), ("fwd", True, "forward +H"), ("fwd_bwd", False, "fwd + bwd"),
           ("fwd_bwd", True, "fwd + bwd +H"))


def _ratio(r):
    if r is None or r.get("ratio") is None:
        return "–" if r is None or "error" not in r else "error"
    return f"{r['ratio']:.2f}× [{r['ratio_min']:.2f}–{r['ratio_max']:.2f}]"


def _err(recs):
    """Max error against float64 over this implementation's records of a shape: log p, entropy, ∂W."""
    worst = {}
    for r in recs:
        for k, v in r.get("errors", {}).items():
            worst[k] = max(worst.get(k, 0.0), v)
    keys = [k for k in ("logps", "entropy", "kl", "dh", "dW") if k in worst]
    return " · ".join(f"{k} {worst[k]:.0e}" for k in keys) or "–"


def _mib(b):
    return "–" if b is None else (f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB")


def cpu_table(data: dict) -> str:
    h = data["header"]
    timed = data["records"]
    lines = [f"CPU: {h.get('cpu_model')}, {h.get('threads')} threads of {h.get('cores')} cores, fp32, torch "
             f"{h.get('torch')}, commit `{(h.get('commit') or '')[:10]}`, {h.get('date')}; load average "
             f"{', '.join(f'{x:.1f}' for x in h.get('load_before', []))} before"
             + (f", {', '.join(f'{x:.1f}' for x in h['load_after'])} after; " if h.get("load_after") else "; ")
             + "".join(f"{k}={v}; " for k, v in h.get("env", {}).items())
             + f"{h.get('reps')} interleaved "
             f"repeats. Time as a multiple of the bare matmul's median in the same run (forward: 1 GEMM; "
             f"forward + backward: 3), median [min–max]; +H = with entropy. Peers: "
             + ", ".join(f"{k} {v}" for k, v in sorted(h.get("versions", {}).items())) + ".", ""]
    if h.get("note"):
        lines[-1:] = ["", f"Note: {h['note']}", ""]
    if h.get("command") and not h.get("parts"):  # one invocation: its command line
        lines.insert(-1, f"Command: `{h['command']}`.")
    for part in h.get("parts", []):  # a run made of several invocations: each one's command, commit and load
        lines.insert(-1, f"- `{part.get('command')}`: commit `{(part.get('commit') or '')[:10]}`, {part.get('date')}, "
                         f"load {', '.join(f'{x:.1f}' for x in part.get('load_before') or [])} before"
                         + (f", {', '.join(f'{x:.1f}' for x in part['load_after'])} after" if part.get("load_after")
                            else ""))
    for op, labels in (("logps", LABEL), ("kl", KL_LABEL)):
        shapes = sorted({(r["N"], r["H"], r["V"]) for r in timed if r["op"] == op},
                        key=lambda s: s[0] * s[1] * s[2])
        for shape in shapes:
            here = [r for r in timed if r["op"] == op and (r["N"], r["H"], r["V"]) == shape]
            cols = [c for c in COLUMNS if any((r["mode"], r["entropy"]) == c[:2] for r in here)]
            title = "log-probs" if op == "logps" else "KL"
            lines.append(f"| {title} (N, H, V) = {shape} | " + " | ".join(c[2] for c in cols)
                         + " | max error vs float64 |")
            lines.append("|---|" + "---:|" * len(cols) + "---|")
            for name in ORDER:
                mine = [r for r in here if r["impl"] == name]
                if not mine:
                    continue
                cells = []
                for mode, ent, _ in cols:
                    match = [r for r in mine if (r["mode"], r["entropy"]) == (mode, ent)]
                    cells.append(_ratio(match[0]) if match else "–")
                lines.append(f"| {labels[name]} | " + " | ".join(cells) + f" | {_err(mine)} |")
            lines.append("")
    mem = data.get("memory", [])
    for shape in sorted({(r["N"], r["H"], r["V"]) for r in mem}):
        lines.append(f"| peak memory growth, forward + backward, (N, H, V) = {shape} | log-probs | log-probs + "
                     f"entropy | KL |")
        lines.append("|---|---:|---:|---:|")
        for name in ORDER:
            mine = [r for r in mem if r["impl"] == name and (r["N"], r["H"], r["V"]) == shape]
            if not mine:
                continue

            def cell(op, ent):
                m = [r for r in mine if r["op"] == op and r["entropy"] == ent]
                return "–" if not m else ("error" if m[0].get("error") else _mib(m[0]["peak_mem_bytes"]))

            lines.append(f"| {LABEL[name]} | {cell('logps', False)} | {cell('logps', True)} | {cell('kl', False)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "cpu" / "cpu.json"
    print(cpu_table(json.loads(path.read_text())))
