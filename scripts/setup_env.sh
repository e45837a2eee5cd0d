#!/usr/bin/env bash
# Usage: scripts/setup_env.sh VENV TRANSFORMERS_SPEC [EXTRAS]
# Creates (or reuses) a virtual environment with this repo installed in editable mode, torch from constraints.txt.
set -euo pipefail
venv=$1 spec=$2 extras=${3:-test}
root="$(cd "$(dirname "$0")/.." && pwd)"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$root/constraints.txt" \
    -e "$root[$extras]" "$spec" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c "import torch, transformers; print(f'{transformers.__version__=} {torch.__version__=}')"
