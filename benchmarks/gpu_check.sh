#!/usr/bin/env bash
# The GPU checks in one command: bf16 against float32 for every attention implementation (eager, sdpa, and
# flash-attn when installed) on CUDA, the demo model's accuracy through `generate` on CUDA in float32 and bf16,
# then the bf16 benchmark against transformers' InternVL.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [gpu_bench.py options]
#
# Writes OUT_DIR/gpu_numerics.txt, OUT_DIR/gpu_demo.txt, OUT_DIR/gpu_bench.txt and OUT_DIR/gpu.json (OUT_DIR defaults to gpu-results).
# DEMO_DEVICE and DEMO_SAMPLES (default cuda and 64) choose where and on how many samples the demo is scored.
# Uses the Python environment it finds (${PYTHON:-python3}); where `import pvc` fails there it imports this folder as
# `pvc` (torch, transformers and einops must be present).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${1:-gpu-results}
shift || true
mkdir -p "$out"
if ! "$python" -c "import pvc" 2>/dev/null; then  # a link named pvc to this folder: works offline, installs nothing
    import_dir=$(mktemp -d) && ln -s "$PWD" "$import_dir/pvc"
    export PYTHONPATH="$import_dir${PYTHONPATH:+:$PYTHONPATH}"
fi
status=0  # the benchmark runs even when a numerics check fails; the exit status reports either
"$python" -m pytest -q -p no:cacheprovider tests/test_modeling.py -k bfloat16 -rs 2>&1 | tee "$out/gpu_numerics.txt" ||
    status=$?
for dtype in float32 bfloat16; do
    echo "demo model, $dtype on ${DEMO_DEVICE:-cuda}:"
    "$python" -m pvc.demo --eval "${DEMO_SAMPLES:-64}" --seed 1 --dtype $dtype --device "${DEMO_DEVICE:-cuda}" 2>&1 | grep -v "^Loading"
done | tee "$out/gpu_demo.txt" || status=$?
"$python" benchmarks/gpu_bench.py --out "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu_bench.txt" || status=$?
exit $status
