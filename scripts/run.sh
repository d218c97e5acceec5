#!/usr/bin/env bash
# The main job on the built-in default: `fusealign compare` — per seed (3), SFT → reward model → PPO / GRPO,
# and DPO from the same SFT policy (offline, on-policy, iterative pairs), evaluated on held-out prompts
# (table with 95 % intervals, compare.json, frontier.png, report.md under runs/compare). A few minutes on a
# 2-core CPU. Extra arguments go to `fusealign compare` (e.g. --preset smoke, --seeds 0,1,2,3,4).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/venv.sh"
cd "$root"
exec "${FUSEALIGN_VENV:-$root/.venv}/bin/fusealign" compare "$@"
