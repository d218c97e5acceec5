"""Regenerate the README's result tables from committed raw results (never typed by hand).

    python scripts/readme_tables.py      # rewrites the sections between <!-- compare:begin/end --> markers
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compare_section() -> str:
    from fusealign.engine.compare import table

    path = ROOT / "benchmarks" / "results" / "compare" / "compare.json"
    r = json.loads(path.read_text())
    head = (f"From `{path.relative_to(ROOT)}` (preset `{r['config']['preset']}`, device {r['device']}, "
            f"seed {r['config']['seed']}); knob = KL coefficient for PPO, β for DPO; ± is the standard error "
            f"over {r['preset']['eval_prompts']} held-out prompts.\n")
    return head + "\n```\n" + table(r["rows"]) + "\n```\n\n![reward vs KL](benchmarks/results/compare/frontier.png)\n"


def replace(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    a, b = text.index(begin) + len(begin), text.index(end)
    return text[:a] + "\n" + body + text[b:]


if __name__ == "__main__":
    readme = ROOT / "README.md"
    readme.write_text(replace(readme.read_text(), "compare", compare_section()))
