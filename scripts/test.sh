#!/usr/bin/env bash
# The test suite three times: on the lowest transformers and PyAV this repo supports (constraints-floor.txt) and on
# the newest 5.x release, both without torchvision (PIL and PyAV only), then on the newest with torchvision
# (constraints-vision.txt: the torchvision backends and transformers' video processor); then serving with vLLM and
# evaluating with lmms-eval, each in its own environment (scripts/test_vllm.sh and scripts/test_lmms_eval.sh;
# PVC_SKIP_VLLM=1 and PVC_SKIP_LMMS_EVAL=1 leave them out).
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for setting in ".venv-floor transformers==5.0.0 test constraints-floor.txt" ".venv transformers>=5.0,<6 test constraints.txt" \
    ".venv-vision transformers>=5.0,<6 test,vision constraints-vision.txt"; do
    read -r venv spec extras constraints <<<"$setting"
    echo "=== $spec, extras $extras ($venv)"
    bash scripts/setup_env.sh "$venv" "$spec" "$extras" "$PWD/$constraints"
    "$venv/bin/python" -m pytest tests -q -p no:cacheprovider "$@" || status=$?
done
if [ -z "${PVC_SKIP_VLLM:-}" ]; then
    echo "=== vLLM (.venv-vllm)"
    bash scripts/test_vllm.sh || status=$?
fi
if [ -z "${PVC_SKIP_LMMS_EVAL:-}" ]; then
    echo "=== lmms-eval (.venv-lmms)"
    bash scripts/test_lmms_eval.sh || status=$?
fi
exit $status
