#!/usr/bin/env bash
# Usage: scripts/setup_env.sh VENV TRANSFORMERS_SPEC [EXTRAS] [CONSTRAINTS]
# Creates (or reuses) a virtual environment with this repo installed in editable mode, torch (and torchvision) as
# CONSTRAINTS pins them (constraints.txt by default; constraints-vision.txt for the environment with torchvision).
# An environment already set up for the same spec, extras, setup.py and constraints is reused without pip.
set -euo pipefail
venv=$1 spec=$2 extras=${3:-test}
root="$(cd "$(dirname "$0")/.." && pwd)"
constraints=${4:-$root/constraints.txt}
stamp="$venv/.pvc-setup"
wanted="$spec [$extras] $(cat "$root/setup.py" "$constraints" "$root"/constraints*.txt | sha256sum | cut -c1-16)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi
echo "Setting up $venv ($spec, extras $extras): the first time this downloads torch and transformers, a few minutes." >&2
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
if [ -n "${PVC_TORCH_INDEX:-}" ]; then  # e.g. https://download.pytorch.org/whl/cpu for the CPU-only build
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints" torch \
        --index-url "$PVC_TORCH_INDEX"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints" \
    -e "$root[$extras]" "$spec" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c "import torch, transformers; print(f'{transformers.__version__=} {torch.__version__=}')" >&2
echo "$wanted" >"$stamp"
