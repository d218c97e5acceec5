#!/usr/bin/env bash
# The main job on the built-in default: `fusealign dpo` on the built-in task (trains the SFT policy it
# starts from, then DPO, then prints the final metrics). Extra arguments go to `fusealign dpo`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/venv.sh"
cd "$root"
exec "${FUSEALIGN_VENV:-$root/.venv}/bin/fusealign" dpo "$@"
