"""Regenerate the README's result sections from committed raw results (never typed by hand).

    python scripts/readme_tables.py      # rewrites the sections between <!-- compare/cpu-bench:begin/end --> markers

The compare section has two parts, each rendered from a committed `compare.json` by `report_markdown` (the
function that writes every run's report.md) with the plot's path from the repository root and headings one
level down:
  - the seed study, `benchmarks/results/compare-10seeds/` (`fusealign compare --seeds 0-9`): findings, the
    seed document's claims with their verdicts (engine/study/claims.py), the matched-KL differences with the seeds
    that would resolve each, the plot (its full table stays in its report.md). Until that directory is
    committed, a paragraph says so and gives the commands that make it;
  - the quick check, `benchmarks/results/compare/` (the main job, `bash scripts/run.sh`: 3 seeds), in full.
The cpu-bench section is benchmarks/cpu_table.py's table of the committed CPU benchmark,
`benchmarks/results/cpu/cpu.json` (benchmarks/bench_cpu.py).
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "compare"
STUDY = ROOT / "benchmarks" / "results" / "compare-10seeds"
STUDY_COMMAND = "fusealign compare --seeds 0-9"


def _load(d: Path):
    return json.loads((d / "compare.json").read_text()) if (d / "compare.json").exists() else None


def study_block(study_dir: Path = STUDY) -> str:
    """The seed study's part of the section, or, while it is not committed, how to make it."""
    from fusealign.engine.study.report import report_markdown

    rel = Path(os.path.relpath(study_dir, ROOT)).as_posix()
    r = _load(study_dir)
    if r is None:
        return "\n".join([
            f"### PPO or DPO? The seed study, `{STUDY_COMMAND}`",
            "",
            f"Not committed yet: `{rel}/` will hold it (an estimated 13 minutes on the 2-core CPU machine: 3 seeds take about 4). Until then the "
            "quick check below judges the seed document's claims at its 3 seeds. To make it: "
            f"`bash scripts/run.sh --seeds 0-9 --output-dir runs/compare-10seeds`, then "
            f"`bash scripts/keep_compare.sh runs/compare-10seeds {rel}`.",
            "",
        ])
    return report_markdown(r, image=f"{rel}/frontier.png", level=3, results_table=False) \
        + f"Every row's table: [`{rel}/report.md`]({rel}/report.md).\n"


def compare_section(study_dir: Path = STUDY, main_dir: Path = RESULTS) -> str:
    from fusealign.engine.study.report import report_markdown

    r = _load(main_dir)
    image = Path(os.path.relpath(main_dir / "frontier.png", ROOT)).as_posix()
    quick = report_markdown(r, image=image, level=3, title=f"Quick check: the main job, `fusealign compare --preset "
                                                             f"{r['config']['preset']}` ({len(r['seeds'])} seeds)")
    return study_block(study_dir) + "\n" + quick


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
