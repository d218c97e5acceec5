"""Regenerate the README's result sections from committed raw results (never typed by hand).

    python scripts/readme_tables.py      # rewrites the sections between <!-- compare/cpu-bench:begin/end --> markers

The compare section is the committed default-preset report, `benchmarks/results/compare/report.md`, rendered
again from its `compare.json` by the same function (`report_markdown`) with the plot's path from the repository
root and headings one level down. The cpu-bench section is benchmarks/cpu_table.py's table of the committed
CPU benchmark, `benchmarks/results/cpu/cpu.json` (benchmarks/bench_cpu.py).
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "compare"


def compare_section() -> str:
    from fusealign.engine.report import report_markdown

    r = json.loads((RESULTS / "compare.json").read_text())
    image = (RESULTS / "frontier.png").relative_to(ROOT).as_posix()
    return report_markdown(r, image=image, level=3)


def cpu_section() -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cpu_table import cpu_table

    return cpu_table(json.loads((ROOT / "benchmarks" / "results" / "cpu" / "cpu.json").read_text()))


def replace(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    a, b = text.index(begin) + len(begin), text.index(end)
    return text[:a] + "\n" + body + text[b:]


if __name__ == "__main__":
    readme = ROOT / "README.md"
    text = replace(readme.read_text(), "compare", compare_section())
    readme.write_text(replace(text, "cpu-bench", cpu_section()))
