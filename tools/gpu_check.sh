#!/usr/bin/env bash
# GPU check of sparse-detr in one command, at most 6 minutes on one H100/H200:
#   1. build   sparse_detr._C with both CUDA kernel pairs for the local GPU (setup.py build_ext --inplace);
#   2. tests   every CUDA test (pytest -m cuda): both kernel pairs (default, fast), fp32 / fp16 / bf16 / mixed
#              dtype (16-bit value, fp32 locations and weights), fp64 gradcheck, non-finite locations;
#   3. op      tools/benchmark_op.py: default vs fast vs reference at the dense-encoder, sparse-encoder and
#              decoder shapes, forward and forward+backward, fp32 and bf16 (mixed, as the model runs it);
#   4. model   tools/benchmark.py under bf16 autocast, dense (Efficient DETR) vs Sparse DETR rho = 0.1: FPS at
#              batch 1 and 4, training step time, peak memory; once per kernel pair;
#   5. report  one markdown + JSON report (tools/gpu_report.py): OUT/report.md and OUT/report.json.
# Each stage gets at most its own time limit and never more than what is left of the 6 minutes; a stage cut
# short is marked so in the report. Usage:
#   tools/gpu_check.sh [OUT]        # default OUT: outputs/gpu_check_<date>
# Record the report's tables in docs/benchmarks.md with the GPU name it prints.
set -uo pipefail
cd "$(dirname "$0")/.."
stamp="$(date +%Y%m%d_%H%M%S)"
OUT="${1:-outputs/gpu_check_${stamp}}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's sparse_detr (built in place below)
BUDGET_S="${GPU_CHECK_BUDGET_S:-360}"
t0=$(date +%s)
: > "$OUT/stages.tsv"  # stage <tab> exit status <tab> seconds

# run_stage NAME LIMIT_S CMD...: run CMD with a timeout of min(LIMIT_S, what is left), record its status.
run_stage() {
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - t0) ))
  if (( left <= 5 )); then
    echo "== $name: skipped (the ${BUDGET_S} s budget is spent) =="
    printf '%s\t%s\t%s\n' "$name" "skipped" 0 >> "$OUT/stages.tsv"
    return 1
  fi
  (( left < limit )) && limit=$left
  echo "== $name (limit ${limit} s) =="
  local start=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" $(( $(date +%s) - start )) >> "$OUT/stages.tsv"
  return $rc
}

echo "== machine =="
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" \
  || echo "nvidia-smi not found"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" \
  | tee "$OUT/torch.txt"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')" || {
    echo "no usable GPU: cannot pick TORCH_CUDA_ARCH_LIST" >&2; exit 1; }
fi
export TORCH_CUDA_ARCH_LIST

status=0
FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" run_stage build 200 python setup.py -q build_ext --inplace || {
  echo "BUILD FAILED" >&2
  python tools/gpu_report.py "$OUT" || true
  exit 1
}
python -c "from sparse_detr.ops import available_backends; print('backends:', available_backends())"

run_stage tests 100 python -m pytest -m cuda -q -rs -p no:cacheprovider --junitxml "$OUT/tests_cuda.xml" tests \
  || status=1

run_stage op_fp32 30 python tools/benchmark_op.py --device cuda --dtype float32 --repeats 20 \
  --markdown "$OUT/op_float32.md" --json "$OUT/op_float32.json" || status=1
run_stage op_bf16 30 python tools/benchmark_op.py --device cuda --dtype bfloat16 --coord-dtype float32 \
  --repeats 20 --markdown "$OUT/op_bfloat16.md" --json "$OUT/op_bfloat16.json" || status=1

for pair in default fast; do
  SPARSE_DETR_CUDA_KERNEL="$pair" run_stage "model_bf16_$pair" 60 python tools/benchmark.py \
    --configs configs/efficient_detr_r50.yaml configs/sparse_detr_r50_rho0.1.yaml --device cuda --images 2 \
    --batch-size 1 4 --runs 5 --train-step --train-runs 3 --autocast bfloat16 \
    --markdown "$OUT/model_bf16_$pair.md" --json "$OUT/model_bf16_$pair.json" || status=1
done

python tools/gpu_report.py "$OUT" || status=1
echo "== done in $(( $(date +%s) - t0 )) s: status $status (0 = all passed); report $OUT/report.md =="
exit $status
