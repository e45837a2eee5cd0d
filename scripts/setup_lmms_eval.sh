#!/usr/bin/env bash
# Usage: scripts/setup_lmms_eval.sh [VENV]   (default .venv-lmms)
# An environment for `lmms-eval --model pvc` on a CPU (or CUDA) machine: this repo with its `eval` extra
# (lmms-eval 0.7.3, filelock < 4), torch from constraints.txt. lmms-eval asks for torchvision, and the one pip takes
# from PyPI beside a CPU torch fails to import ("operator torchvision::nms does not exist") and breaks
# transformers' image code; PVC and lmms-eval's task code need none, so it is removed. Reused when set up already.
set -euo pipefail
venv=${1:-.venv-lmms}
root="$(cd "$(dirname "$0")/.." && pwd)"
stamp="$venv/.pvc-setup"
wanted="lmms-eval $(cat "$root/setup.py" "$root/constraints.txt" "$0" | sha256sum | cut -c1-16)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi
echo "Setting up $venv for lmms-eval: the first time this downloads lmms-eval and its packages, a few minutes." >&2
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install -c "$root/constraints.txt" torch 2>&1 | grep -v "^WARNING: Location" || true
"${pip[@]}" install -c "$root/constraints.txt" -e "$root[eval,video]" pytest 2>&1 | grep -v "^WARNING: Location" || true
"${pip[@]}" uninstall -y torchvision 2>&1 | grep -v "not installed" || true
"$venv/bin/python" -c "import lmms_eval, torch, transformers; print(f'{transformers.__version__=} {torch.__version__=}')" >&2
echo "$wanted" >"$stamp"
