#!/usr/bin/env bash
# The main job on the built-in default. Until the engine lands this is the kernel benchmark on the
# default device: the full grid on a GPU, a smoke shape on the CPU.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/venv.sh"
cd "$root"
exec "${FUSEALIGN_VENV:-$root/.venv}/bin/python" benchmarks/bench_logps.py "$@"
