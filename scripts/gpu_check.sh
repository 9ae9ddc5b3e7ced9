#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU, a CUDA build of torch, nvcc
# and ninja (no network needed):
#
#   scripts/gpu_check.sh OUT_DIR
#
# Builds pyconvext in place for the visible GPU, runs the CUDA tests, runs
# compute-sanitizer (memcheck and racecheck) over a small subset, and races the
# CUDA kernels against native PyTorch (the operators in $BENCH_OPS, default
# "conv2d max_pool2d models"). Writes into OUT_DIR: build.log, tests.log,
# sanitizer.log, bench.log, bench.md (the result tables) and summary.txt.
# Exits non-zero when any step failed.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME LOG COMMAND...: runs COMMAND, appending to LOG
  local name=$1 log=$2
  shift 2
  echo "== $name: $*" | tee -a "$log"
  local start=$SECONDS
  "$@" >>"$log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  if [ $rc -ne 0 ]; then
    failed+=("$name")
    tail -n 20 "$log"
  fi
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/summary.txt"
arch=$($python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || exit 1
export TORCH_CUDA_ARCH_LIST=$arch FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${CUDA_HOME:-}" ] && ! [ -x /usr/local/cuda/bin/nvcc ] && command -v nvcc >/dev/null; then
  export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi

step build "$out/build.log" $python -m pip install --no-build-isolation --no-deps -e . || {
  echo "build failed" | tee -a "$out/summary.txt"
  exit 1
}
$python -m pyconvext info >>"$out/build.log" 2>&1

parallel=()
if $python -c "import xdist" 2>/dev/null; then parallel=(-n 4); fi
step tests "$out/tests.log" $python -m pytest -m cuda tests "${parallel[@]}" -q -rfEs

: >"$out/bench.md"
bench() {  # bench NAME ARGS...: one table into bench.md
  local name=$1
  shift
  step "bench-$name" "$out/bench.log" $python -m pyconvext bench --device cuda --min-time 0.3 \
    --markdown "$out/bench-part.md" "$@" && { cat "$out/bench-part.md"; echo; } >>"$out/bench.md"
}
for op in ${BENCH_OPS:-conv2d max_pool2d models}; do
  case $op in
    conv2d)
      for dtype in float32 bfloat16; do
        for scale in 1 8; do bench "conv2d-$dtype-x$scale" --op conv2d --dtype "$dtype" --batch-scale $scale; done
      done ;;
    max_pool2d)
      for batch in 8 64; do bench "max_pool2d-float32-n$batch" --op max_pool2d --batch $batch; done
      bench max_pool2d-bfloat16-n64 --op max_pool2d --dtype bfloat16 --batch 64 ;;
    models)
      bench models-float32 --models ;;
  esac
done
rm -f "$out/bench-part.md"
grep -h "geometric mean" "$out/bench.log" >>"$out/summary.txt"

# A few shapes through every kernel (direct and GEMM; FMA and tensor cores),
# checking only pyconvext's kernels.
subset="test_gemm_shapes_float32 and (tiles_and_tails or stride3_dilated or long_reduction or one_input_channel or stride4_11x11) or test_reduced_precision and bfloat16 and (narrow_rows or depthwise_large or stride2_5x5)"
filter=()
sanitizer_help=$(compute-sanitizer --help 2>&1)  # (grep -q in a pipe would fail it under pipefail)
if [[ $sanitizer_help == *--kernel-name* ]]; then filter=(--kernel-name kns=pyconvext); fi
pool_subset="test_gradients_match_the_cpu or test_dtypes_and_layouts and (float32 or bfloat16) and (channels_last or batchless) or test_out_of_range"
for tool in memcheck racecheck; do
  step "sanitizer-$tool" "$out/sanitizer.log" timeout 150 compute-sanitizer --tool "$tool" "${filter[@]}" \
    --error-exitcode 1 $python -m pytest -q -p no:cacheprovider tests/test_conv2d_cuda.py -k "$subset"
  step "sanitizer-$tool-max_pool2d" "$out/sanitizer.log" timeout 150 compute-sanitizer --tool "$tool" \
    "${filter[@]}" --error-exitcode 1 $python -m pytest -q -p no:cacheprovider tests/test_max_pool2d_cuda.py \
    -k "$pool_subset"
done


if [ ${#failed[@]} -ne 0 ]; then
  echo "FAILED: ${failed[*]}" | tee -a "$out/summary.txt"
  exit 1
fi
echo "all GPU checks passed" | tee -a "$out/summary.txt"
