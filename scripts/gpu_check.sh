#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: the CUDA tests, then the GPU benchmark.
#
#   bash scripts/gpu_check.sh            # results under $OUT if set, else /tmp/deformops-gpu-check
#
# Needs python3 with cupy (cupy-cuda13x or -12x), numpy, scipy, numba, pytest, hypothesis;
# torch + torchvision for the torchvision/cuDNN/grid_sample peers (skipped without them).
# Nothing is downloaded: the package runs from this checkout through PYTHONPATH. Budget: about
# 5 minutes of tests (the first ones include NVRTC compilation of every module) and 3 of
# benchmark. Exit status: that of the tests (the benchmark's is printed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-${TMPDIR:-/tmp}/deformops-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# the adapters (deformops_torch, deformops_tf) are top-level packages under adapters/
export PYTHONPATH="$PWD:$PWD/adapters${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export CI="${CI:-1}"  # derandomized hypothesis profile; compile test must not skip
export DEFORMOPS_REQUIRE_GPU=1  # the GPU tests fail instead of skipping when CuPy sees no GPU

{ nvidia-smi 2>&1 || echo "nvidia-smi not available"; } | tee "$OUT/nvidia-smi.txt" | head -15
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/nvidia-smi.txt"
import cupy, numpy, deformops
print("cupy", cupy.__version__, "numpy", numpy.__version__, "GPUs", cupy.cuda.runtime.getDeviceCount())
try:
    import torch, torchvision
    print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available())
except Exception as e:  # noqa: BLE001
    print("torch/torchvision unavailable:", e)
PYEOF

echo "== CUDA tests"
timeout 330 "$PY" -m pytest tests/test_cuda_ops.py tests/test_cuda_dispatch.py tests/test_cuda_compile.py \
    -q -p no:cacheprovider -rfEs --durations=10 --junitxml="$OUT/cuda-tests.xml" 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== GPU benchmark"
timeout 200 "$PY" -m deformops.bench gpu --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.md"
bench_rc=${PIPESTATUS[0]}

echo
echo "== summary: tests exit $tests_rc, benchmark exit $bench_rc; files in $OUT"
tail -3 "$OUT/tests.log"
exit "$tests_rc"
