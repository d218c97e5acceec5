#!/usr/bin/env bash
# Keep a finished `fusealign compare` run as a committed result, with nothing typed by hand: copy its
# compare.json into DEST, re-render report.md and frontier.png there from it with the report code
# (`python -m fusealign.engine.study.report DEST`: the numbers are not touched), then regenerate the README's
# compare section (scripts/readme_tables.py). `git add DEST README.md` and the commit are left to you.
#   bash scripts/keep_compare.sh runs/compare-10seeds benchmarks/results/compare-10seeds
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: bash scripts/keep_compare.sh RUN_DIR DEST (e.g. runs/compare-10seeds benchmarks/results/compare-10seeds)" >&2
    exit 2
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py="${FUSEALIGN_VENV:-$root/.venv}/bin/python"
if [ ! -f "$1/compare.json" ]; then
    echo "keep_compare.sh: $1/compare.json not found: run \`fusealign compare --output-dir $1\` to the end first" >&2
    exit 2
fi
mkdir -p "$2"
cp "$1/compare.json" "$2/compare.json"
"$py" -m fusealign.engine.study.report "$2"
"$py" "$root/scripts/readme_tables.py"
echo "kept $1 as $2 (compare.json, report.md, frontier.png); README.md regenerated: git add $2 README.md"
