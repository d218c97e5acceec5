#!/usr/bin/env bash
# The test command: sets up .venv, then runs the whole suite (Triton under the interpreter without CUDA) on every
# core (pytest-xdist, one file per worker at a time: module fixtures are built once), the 15 slowest tests listed.
# Files are handed out in collection order (--no-loadscope-reorder: xdist would sort them by test count), which
# tests/conftest.py starts with the files that take a minute or more.
# Arguments go to pytest; paths among them replace `tests`. Tests marked `ci_step` (the GPU suite's dry run) are
# left to their own step of .ci/run; `-m ci_step` selects them.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/venv.sh"
cd "$root"
paths=0
for a in "$@"; do [[ $a != -* && -e $a ]] && paths=1; done
[ $paths = 1 ] || set -- tests "$@"
exec "${FUSEALIGN_VENV:-$root/.venv}/bin/python" -m pytest -q -p no:cacheprovider -n "${FUSEALIGN_TEST_WORKERS:-auto}" \
  --dist loadfile --no-loadscope-reorder --durations=15 -m "not ci_step" "$@"
