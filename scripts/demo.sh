#!/usr/bin/env bash
# One image and one video through PVC end to end (a small random model unless --model is given).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv "transformers>=5.0,<6" test >/dev/null
exec .venv/bin/python -m pvc.demo "$@"
