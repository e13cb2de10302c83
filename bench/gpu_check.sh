#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU (the device tool's H200, which
# has numba, numba-cuda, CuPy, PyTorch and Cython but no package registry):
#   1. use fastloss from this checkout (no install from a registry),
#   2. run the CUDA side of the tests (marker cuda: tests/cuda and every test
#      parametrized by the backend fixture) on the real chip,
#   3. time every loss against PyTorch CUDA and a device-to-device copy,
#      writing gpu.md / gpu.json (bench/gpu_bench.py);
#   4. time the fused linear cross-entropy against PyTorch's unfused path, with
#      the peak memory of each (bench/gpu_linear_ce.py: gpu_linear_ce.md / .json).
# Usage: bash bench/gpu_check.sh [OUT_DIR]  (default: $OUT, else bench/results)
# QUICK=1 for small sizes; TEST_TIMEOUT / BENCH_TIMEOUT in seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python - <<'PY'
import importlib
for name in ("numpy", "numba", "numba_cuda", "cupy", "torch", "Cython"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "missing:", exc)
PY
} 2>&1 | tee "$out/gpu_env.txt"

# The Cython extension serves only the CPU center update; build it if we can.
python setup.py build_ext --inplace -q >"$out/build.txt" 2>&1 || echo "build_ext failed (CPU center update only): see build.txt"

echo "== GPU tests (first calls compile each kernel for this GPU)"
timeout "${TEST_TIMEOUT:-270}" python -m pytest tests -m cuda -q -p no:cacheprovider -x \
  2>&1 | tee "$out/gpu_tests.txt" | tail -25
echo "tests exit: ${PIPESTATUS[0]}"

echo "== GPU timings"
timeout "${BENCH_TIMEOUT:-300}" python bench/gpu_bench.py --out "$out/gpu" ${QUICK:+--quick} \
  2>&1 | tee "$out/gpu_bench.txt" | tail -40
echo "bench exit: ${PIPESTATUS[0]}"

echo "== linear cross-entropy on the GPU"
timeout "${LCE_TIMEOUT:-180}" python bench/gpu_linear_ce.py --out "$out/gpu_linear_ce" ${QUICK:+--quick} \
  2>&1 | tee "$out/gpu_linear_ce.txt" | tail -12
echo "linear cross-entropy exit: ${PIPESTATUS[0]}"
