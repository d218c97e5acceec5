#!/usr/bin/env bash
# The main job on the built-in default: `fusealign compare` — SFT → reward model → PPO, and DPO from the
# same SFT policy, evaluated on held-out prompts (table, compare.json, frontier plot under runs/compare).
# A few minutes on a 2-core CPU. Extra arguments go to `fusealign compare` (e.g. --preset smoke).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/venv.sh"
cd "$root"
exec "${FUSEALIGN_VENV:-$root/.venv}/bin/fusealign" compare "$@"
