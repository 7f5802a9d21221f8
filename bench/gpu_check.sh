#!/usr/bin/env bash
# The one prepared check of an NVIDIA GPU box (H100 / H200): four steps, each
# under its own time limit (510 s in all, 9 minutes with the set-up), one
# PASS/FAIL line each.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # from the repository root
#
#   a. the Pallas kernel tests with the Triton kernels compiled for real;
#   b. the kernel rows at ViT-B shapes against XLA (timings, TFLOP/s, GB/s;
#      FAIL if a kernel differs from XLA by more than 5e-2, bf16);
#   c. ViT-B/16, V-MoE-B/16 and Soft MoE-B/16 train steps in bf16 at batch
#      128, model.moe.kernels=xla vs pallas: img/s and MFU against the
#      measured bf16 matmul peak;
#   d. main.py trains V-MoE (configs/vmoe_b16_digits.py, the embedded digits
#      arrays, no TensorFlow) for 200 steps with kernels=pallas, then resumes:
#      PASS if the loss falls and the resume restores step 200.
#
# The GPU box's stack: Python 3.12, jax 0.11.2 with CUDA, flax, optax, orbax,
# numpy, pytest; no TensorFlow, TFDS or scikit-learn. Pure-Python packages
# it lacks (ml-collections, tensorboardX, ...) travel as wheels in .whl/
# (see docs/kernels.md) and are installed first when present.
#
# On a host without a GPU the same steps run CPU-sized (the rehearsal: the
# Triton lowering tests, interpreted kernel rows, the digits train step,
# 20 main.py steps): every step goes through its code up to the GPU work.
set -u
OUT="${1:-bench/results/gpu_check}"
mkdir -p "$OUT"
: > "$OUT/summary.txt"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/vmoe-site .whl/*.whl && \
    export PYTHONPATH="/tmp/vmoe-site:${PYTHONPATH:-}"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=3

GPU=$(python3 -c 'import jax; print(int(jax.default_backend() == "gpu"))' \
      2>/dev/null || echo 0)
{ date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    2>/dev/null || echo "no nvidia-smi"
  python3 -c 'import jax, sys; print("python", sys.version.split()[0], "jax", jax.__version__, jax.devices())'
} 2>&1 | tee "$OUT/device.txt"
[ "$GPU" = 1 ] || echo "no GPU: CPU rehearsal of every step" | tee -a "$OUT/device.txt"

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND under LIMIT, logs to
# OUT/NAME.log, prints "PASS|FAIL NAME (s of limit)".
step() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$? took=$((SECONDS - start)) verdict=PASS why=""
  if [ $rc -ne 0 ]; then
    verdict=FAIL
    why=" exit $rc$([ $rc -eq 124 ] && echo ', time limit')"
  fi
  echo "$verdict $name (${took} s of ${limit} s)$why" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || tail -n 15 "$OUT/$name.log"
}

if [ "$GPU" = 1 ]; then
  step a_kernel_tests 120 python3 -m pytest -q -p no:cacheprovider -m "not slow" \
    -k "not tpu" tests/test_pallas_dispatch.py tests/test_pallas_gmm.py \
    tests/test_pallas_routing.py tests/test_pallas_soft_moe.py
  step b_kernel_rows 120 python3 -m bench.kernels --no-train --dims B \
    --max-error 5e-2
  step c_train_steps 150 python3 -m bench.kernels --no-kernels --batch 128 \
    --models "ViT-B/16,V-MoE-B/16,Soft MoE-B/16"
  step d_main_pallas 120 python3 -m bench.gpu_check_train "$OUT/workdir" 200
else
  step a_kernel_tests 120 python3 -m pytest -q -p no:cacheprovider -m "not slow" \
    -k "lowers" tests/test_pallas_dispatch.py tests/test_pallas_gmm.py \
    tests/test_pallas_routing.py tests/test_pallas_soft_moe.py
  step b_kernel_rows 120 python3 -m bench.kernels --no-train --only routing \
    --backends triton --max-error 1e-4
  step c_train_steps 150 python3 -m bench.kernels --no-kernels --batch 8 \
    --models "V-MoE digits"
  step d_main_pallas 120 python3 -m bench.gpu_check_train "$OUT/workdir" 20
fi
cp bench/results/kernels*.md "$OUT"/ 2>/dev/null || true
echo "== summary"; cat "$OUT/summary.txt"
! grep -q '^FAIL' "$OUT/summary.txt"
