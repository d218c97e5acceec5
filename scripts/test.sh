#!/usr/bin/env bash
# The test command: sets up .venv, then runs the whole suite (Triton under the interpreter without CUDA).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/venv.sh"
cd "$root"
exec "${FUSEALIGN_VENV:-$root/.venv}/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
