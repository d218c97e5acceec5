"""PNG plots of the raw benchmark JSON: time relative to the bare matmul, per shape, one bar per impl.

    python benchmarks/plot_results.py [benchmarks/results/logps-cuda.json ...]
"""

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    recs = [r for r in data["records"] if r.get("median_ms")]
    keys = sorted({(r["mode"], r.get("entropy", False), r["N"], r["V"]) for r in recs})
    impls = sorted({r["impl"] for r in recs})
    fig, ax = plt.subplots(figsize=(max(6, len(keys) * 0.9), 4))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        ys = []
        for k in keys:
            base = next((r for r in recs if (r["mode"], r.get("entropy", False), r["N"], r["V"]) == k
                         and r["impl"] == "matmul"), None)
            mine = next((r for r in recs if (r["mode"], r.get("entropy", False), r["N"], r["V"]) == k
                         and r["impl"] == impl), None)
            ys.append(mine["median_ms"] / base["median_ms"] if mine and base else 0)
        ax.bar([i + j * width for i in range(len(keys))], ys, width, label=impl)
    ax.set_xticks([i + 0.4 for i in range(len(keys))])
    ax.set_xticklabels([f"{m}{'+H' if e else ''}\nN={n} V={v}" for m, e, n, v in keys], fontsize=7)
    ax.set_ylabel("time / bare matmul")
    ax.set_title(f"{path.stem} on {data['header']['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted(RESULTS.glob("*-cuda.json"))
    for p in paths:
        print(plot(p))
