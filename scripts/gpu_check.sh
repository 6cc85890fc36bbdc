#!/usr/bin/env bash
# One GPU check of pldr, under 5 minutes on one GPU (docs/gpu.md says what it prints):
#   1. tests/gpu_checks.py: parity with the original's fixture, generation in float32 and
#      bfloat16, the engine and CUDA-graph decode, training steps, host-device sync counts
#   2. python -m pldr.bench.gpu_report: decode tokens/s of kv_g against the plain-SDPA
#      baseline, batch 16 against 1, compiled decode (CUDA graphs) against eager, training
#      tokens/s in bf16-mixed, and which SDPA kernel ran
# Without a CUDA device it runs the report's CPU smoke (the same code on the tiny preset),
# says so and exits 0; PLDR_GPU_CHECK_REQUIRE=1 makes a missing device an error (exit 1).
# Usage: scripts/gpu_check.sh [JSON_OUT]     (PYTHON=... picks the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
JSON="${1:-gpu_report.json}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); the GPU checks and" \
         "figures need one. Running the report's CPU smoke only."
    "$PY" -m pldr.bench.gpu_report --smoke --device cpu || exit $?
    if [ "${PLDR_GPU_CHECK_REQUIRE:-0}" = "1" ]; then
        echo "gpu_check: PLDR_GPU_CHECK_REQUIRE=1 and no CUDA device: failing" >&2
        exit 1
    fi
    echo "gpu_check: done (CPU smoke only; run this on a machine with an NVIDIA GPU for the figures)"
    exit 0
fi

status=0
echo "== 1/2 tests/gpu_checks.py"
"$PY" -m pytest -q -p no:cacheprovider tests/gpu_checks.py || status=1
echo "== 2/2 speed (110M shape), figures also in $JSON"
"$PY" -m pldr.bench.gpu_report --device cuda --json "$JSON" || status=1
if [ "$status" = 0 ]; then echo "gpu_check: all passed"; else echo "gpu_check: FAILED (see above)"; fi
exit $status
