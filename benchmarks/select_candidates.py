"""Stage (c) of benchmarks/gpu_suite.sh: the selection table kernels/tuned.json from stage (b)'s records.

    python benchmarks/select_candidates.py RECORDS.jsonl --out $OUT/tuned.json [--merge kernels/tuned.json]

For every measured (capability, dtype, H, V class) the candidate with the lowest forward + backward median
among those that were right at that shape and batch-invariant there (bench_candidates.py's `ok` and
`invariant`) becomes the entry for op "logps" ("kl" from the fa_kl:* records, which have no correctness flag
of their own: a KL candidate needs its log-prob twin to have passed). A candidate measured within 2 % of
the default ("fused") loses to it: a change of kernel must pay for itself. The file keeps, beside the
entries, every median it chose from (`measured`) and the run's header; copy it to kernels/tuned.json and
commit it (kernels/candidates.py reads it). A CPU record never makes an entry.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MARGIN = 0.02


def vclass(V: int) -> str:
    from fusealign.kernels.candidates import vclass as _v

    return _v(V)


def select(records: list[dict], margin: float = MARGIN) -> dict:
    from fusealign.kernels.candidates import DEFAULT

    device = next((r for r in records if r.get("kind") == "device"), None)
    if device is None:  # CPU (dry run): nothing to tune
        return dict(version=1, entries={}, measured={})
    arch = "sm_" + device["capability"].replace(".", "")
    passed = {(r["impl"].split(":", 1)[1], r["N"], r["H"], r["V"], r["dtype"]) for r in records
              if r.get("kind") == "bench" and r.get("op") == "logps" and r["impl"].startswith("fa:")
              and r.get("ok") and r.get("invariant")}
    groups: dict = {}
    for r in records:
        if r.get("kind") != "bench" or r.get("mode") != "fwd_bwd" or not r.get("median_ms"):
            continue
        prefix = {"logps": "fa:", "kl": "fa_kl:"}.get(r.get("op"))
        if not prefix or not r["impl"].startswith(prefix):
            continue
        cand = r["impl"][len(prefix):]
        if (cand, r["N"], r["H"], r["V"], r["dtype"]) not in passed:
            continue
        key = f"{arch}/{r['dtype']}/H{r['H']}/{vclass(r['V'])}"
        groups.setdefault((key, r["op"]), {}).setdefault(cand, []).append(r["median_ms"])
    entries, measured = {}, {}
    for (key, op), by_cand in sorted(groups.items()):
        med = {c: sorted(v)[len(v) // 2] for c, v in by_cand.items()}
        best = min(med, key=med.get)
        if DEFAULT in med and med[best] > (1 - margin) * med[DEFAULT]:
            best = DEFAULT
        entries.setdefault(key, {})[op] = best
        measured.setdefault(key, {})[op] = {c: round(m, 4) for c, m in sorted(med.items())}
    return dict(version=1, entries=entries, measured=measured)


def summary(records: list[dict]) -> str:
    """One line per measured implementation: median ms, ratio to cuBLAS's bare head matmul, TFLOP/s, memory."""
    base = {(r["op"], r["V"], r["mode"]): r["median_ms"] for r in records
            if r.get("kind") == "bench" and r.get("impl") == "cublas" and r.get("median_ms")}
    lines = [f"{'op':5} {'V':>7} {'mode':8} {'impl':16} {'ms':>9} {'/cublas':>8} {'TFLOP/s':>8} {'mem/fp32 logits':>15}  ok"]
    for r in records:
        if r.get("kind") != "bench" or "impl" not in r or r.get("op") not in ("logps", "kl"):
            continue
        b = base.get(("logps", r["V"], r["mode"]))
        ms = r.get("median_ms")
        ratio = f"{ms / b:.2f}" if ms and b else "-"
        mem = f"{r['mem_frac_fp32_logits']:.4f}" if r.get("mem_frac_fp32_logits") is not None else "-"
        tf = f"{r['tflops']:.0f}" if r.get("tflops") else "-"
        lines.append(f"{r['op']:5} {r['V']:>7} {r['mode']:8} {r['impl']:16} {(f'{ms:.3f}' if ms else 'error'):>9} "
                     f"{ratio:>8} {tf:>8} {mem:>15}  {r.get('ok', '')}{'' if ms else ' ' + r.get('error', '')[:60]}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("records", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--merge", type=Path, help="an existing tuned.json whose other entries are kept")
    args = p.parse_args(argv)
    records = [json.loads(line) for line in args.records.read_text().splitlines() if line.strip()]
    table = select(records)
    head = next((r for r in records if r.get("kind") == "header" and r.get("stage") == "b"), {})
    table["header"] = {k: head.get(k) for k in ("device", "torch", "triton", "commit", "date")}
    if args.merge and args.merge.exists():
        old = json.loads(args.merge.read_text())
        table["entries"] = {**old.get("entries", {}), **table["entries"]}
        table["measured"] = {**old.get("measured", {}), **table["measured"]}
    args.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(summary(records))
    print("selection (kernels/tuned.json entries):", json.dumps(table["entries"], indent=1))


if __name__ == "__main__":
    main()
