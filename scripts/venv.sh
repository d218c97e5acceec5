#!/usr/bin/env bash
# Creates or updates the project's virtual environment (.venv) and installs fusealign editable.
# Re-installs only when requirements.txt or setup.py changed since the last run (a stamp file).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${FUSEALIGN_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
stamp="$venv/.fusealign-stamp"
want=$(cat "$root/requirements.txt" "$root/requirements-nodeps.txt" "$root/setup.py" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v '^WARNING: Location' || true
  "$venv/bin/python" -m pip install -q -r "$root/requirements.txt" 2>&1 | grep -v '^WARNING: Location' || true
  "$venv/bin/python" -m pip install -q --no-deps -r "$root/requirements-nodeps.txt" 2>&1 | grep -v '^WARNING: Location' || true
  "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$root" 2>&1 | grep -v '^WARNING: Location' || true
  "$venv/bin/python" -c "import fusealign, triton, torch" # fail loudly if the install did not take
  echo "$want" > "$stamp"
fi
