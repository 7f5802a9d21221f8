#!/usr/bin/env bash
# One short check of the Pallas kernels on an NVIDIA GPU (target: H200).
#
#   bash bench/gpu_check.sh [OUT_DIR]       # from the repository root
#
# 1. the kernel tests with the Triton kernels compiled for real (not
#    interpreted; the TPU-interpreter cases are deselected),
# 2. python -m bench.kernels --no-train: every kernel against XLA and the
#    one-hot einsum at ViT-S/B shapes (timings, TFLOP/s, GB/s, errors),
# 3. python -m bench.kernels --no-kernels: V-MoE-B/16 (also dropless) and
#    Soft MoE-B/16 train steps with model.moe.kernels=xla vs pallas.
# Each step has its own time limit, so a slow step cannot eat the others;
# the results (markdown, CSV, JSON) and the logs land in OUT_DIR.
# Needs jax with CUDA (0.10.x or 0.11.x) and numpy; pytest for step 1, flax,
# optax and ml_collections for step 3 (skipped with a note otherwise).
# No TensorFlow.
set -u
OUT="${1:-bench/results}"
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Compare f32 against f32, not against TF32 matmuls of the XLA references.
export JAX_DEFAULT_MATMUL_PRECISION=highest
log() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$OUT/gpu_check.log"; }

log "device"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python -c 'import jax; print("jax", jax.__version__, jax.devices())'
} 2>&1 | tee -a "$OUT/gpu_check.log"

log "1. kernel tests, Triton compiled"
if python -c 'import pytest' 2>/dev/null; then
  tests=$(ls tests/test_pallas_*.py)
  timeout 240 python -m pytest -q -p no:xdist -p no:cacheprovider \
    -k 'not tpu' $tests 2>&1 | tail -n 40 | tee "$OUT/gpu_tests.log"
else
  echo "pytest missing: see the error columns of step 2" | tee -a "$OUT/gpu_check.log"
fi

log "2. kernel rows"
timeout 300 python -m bench.kernels --no-train 2>&1 | tee "$OUT/gpu_kernels.log"

log "3. train steps"
timeout 300 python -m bench.kernels --no-kernels 2>&1 | tee "$OUT/gpu_train.log"

cp bench/results/kernels*.* "$OUT"/ 2>/dev/null || true
log "done"
