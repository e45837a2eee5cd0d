#!/usr/bin/env bash
# `lmms-eval --model pvc`, checked offline against transformers' generate with the demo model (run by
# scripts/test.sh after the main suites; the main suites do not need lmms-eval). Makes .venv-lmms. The serving route
# (lmms-eval's openai_compatible against pvc-serve) runs when .venv-vllm is there (scripts/test_vllm.sh makes it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_lmms_eval.sh .venv-lmms
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -z "${PVC_SKIP_VLLM:-}" ] && [ -x .venv-vllm/bin/pvc-serve ]; then
    export PVC_SERVE="$PWD/.venv-vllm/bin/pvc-serve"
fi
HF_HOME="$work/hf" .venv-lmms/bin/python -m pytest scripts/lmms_eval_check.py -q -p no:cacheprovider "$@"
