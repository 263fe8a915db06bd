#!/usr/bin/env bash
# GPU checks for the Triton kernels: the GPU-only tests at real sizes (every dtype and head
# dim, against kernels/reference.py on the GPU) and the engine tests (test_engine_gpu.py:
# greedy equality with CUDA graphs, bf16 agreement with torch_ref, memory profiling; and
# every other tests/gpu file, e.g. test_vision_gpu.py: the tiny vision-language models vs
# transformers, fp32; tests/gpu/vision_checks.sh runs it with the workload V bench), then
# the microbenchmarks (bench/kernel_bench.py), which print a timing table and write
# bench/results/kernels-<device>-<date>.json. With THROUGHPUT=1 it then runs
# bench/throughput.py (issue 8's workloads; THROUGHPUT_ARGS, e.g. "--workloads A").
# SKIP_KERNEL_BENCH=1 skips the microbenchmarks.
#
#   tests/gpu/run_gpu_checks.sh [RESULTS_DIR] [BENCH_ARGS...]   # e.g. --sweep
#   (RESULTS_DIR default: $OUT if set, else bench/results)
#
# Needs a CUDA GPU with torch + triton; hpcinfer need not be pip-installed (a throwaway shim
# maps kernels/ to hpcinfer.kernels, as pyproject's package-dir does). Not part of CI.
# The machine has torch, triton and transformers only: for the structured-outputs, LoRA and
# quantization checks run `bash dev/device-wheels.sh` here first and carry ".whl" (shim.sh
# installs those wheels there, tests/gpu/site.sh).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RESULTS_DIR=${1:-${OUT:-$REPO/bench/results}}
BENCH_ARGS=("${@:2}")
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HPCINFER_GPU_TESTS=1

# Run from a scratch dir so the repo's own hpcinfer/ (without kernels/) is not first on
# sys.path; the shim there links the package and kernels/ into one importable tree.
# shellcheck source=tests/gpu/shim.sh
source "$REPO/tests/gpu/shim.sh"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
"device", torch.cuda.get_device_name(0))' || exit 1

parallel=()
if "$PY" -c 'import xdist' 2>/dev/null; then
  parallel=(-n 8)   # Triton compiles dominate; spread them over CPU cores
fi
start=$(date +%s)
# GPU_TESTS: a subset, e.g. "tests/gpu/test_engine_gpu.py" (default: all of tests/gpu)
test_paths=()
for t in ${GPU_TESTS:-tests/gpu}; do test_paths+=("$REPO/$t"); done
# GPU_TEST_ARGS: more pytest arguments, last so they win, e.g. "-k trained -n 0 -s"
read -r -a extra <<< "${GPU_TEST_ARGS:-}"
"$PY" -m pytest "${test_paths[@]}" -q -p no:cacheprovider --rootdir "$REPO" \
  -c "$REPO/pyproject.toml" "${parallel[@]}" --durations=10 "${extra[@]}" 2>&1 | tee "$RESULTS_DIR/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
echo "GPU tests: exit $tests_rc in $(( $(date +%s) - start )) s"

bench_rc=0
if [[ ${SKIP_KERNEL_BENCH:-0} != 1 ]]; then
  start=$(date +%s)
  "$PY" "$REPO/bench/kernel_bench.py" --out "$RESULTS_DIR" "${BENCH_ARGS[@]}"
  bench_rc=$?
  echo "bench: exit $bench_rc in $(( $(date +%s) - start )) s"
fi

throughput_rc=0
if [[ ${THROUGHPUT:-0} == 1 ]]; then
  start=$(date +%s)
  # shellcheck disable=SC2086  # THROUGHPUT_ARGS is a list of flags
  "$PY" "$REPO/bench/throughput.py" --out "$RESULTS_DIR" ${THROUGHPUT_ARGS:-}
  throughput_rc=$?
  echo "throughput: exit $throughput_rc in $(( $(date +%s) - start )) s"
fi
exit $(( tests_rc != 0 || bench_rc != 0 || throughput_rc != 0 ))
