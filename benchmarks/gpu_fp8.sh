#!/usr/bin/env bash
# Issue 21's GPU checks in one call (a few minutes on an H100/H200), for the device machine:
#   OUT=/some/folder bash benchmarks/gpu_fp8.sh [path/to/probes/scaled_mm.py]
# 1. torch's block-scaled and row-wise F.scaled_mm probe (which paths work, their error and speed);
# 2. the GPU tests (the cublas, triton and torch FP8 paths against each other; the CPU-tested
#    layouts and emulator again, now beside real cuBLAS);
# 3. benchmarks/fp8_gemm.py and benchmarks/moe_layer.py, results under $OUT (commit them with
#    --update-record from a clean checkout, or copy the JSON into benchmarks/results/).
# Each step runs even if an earlier one failed; its log says what happened.
set -uo pipefail
out=${OUT:?set OUT to the folder for the results}
probe=${1:-shared/probes/scaled_mm.py}
mkdir -p "$out"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee "$out/versions.txt"
git rev-parse HEAD 2>/dev/null >> "$out/versions.txt" || true
if [ -f "$probe" ]; then
    OUT="$out" timeout 240 python "$probe" > "$out/probe.log" 2>&1; echo "probe: exit $?"
else
    echo "probe: $probe not found (pass its path)"
fi
if python -c "import pytest" 2>/dev/null; then
    EFFLLM_FP8_AUTOTUNE=0 timeout 300 python -m pytest -q -x tests/test_gpu.py tests/test_scaled_mm.py -m "not slow" \
        > "$out/tests.log" 2>&1; echo "tests: exit $? (tail: $(tail -n 1 "$out/tests.log"))"
else
    echo "tests: pytest is not installed here (carry its wheel, see the device README)"
fi
timeout 600 python benchmarks/fp8_gemm.py --out "$out/fp8_gemm" > "$out/fp8_gemm.log" 2>&1; echo "fp8_gemm: exit $?"
timeout 400 python benchmarks/moe_layer.py --out "$out/moe_layer" > "$out/moe_layer.log" 2>&1; echo "moe_layer: exit $?"
