#!/usr/bin/env bash
# GPU check of the deformable attention op, in one command on a machine with an NVIDIA GPU:
#   1. builds sparse_detr._C with the CUDA kernel (FORCE_CUDA=1 pip install -e . --no-build-isolation),
#      for TORCH_CUDA_ARCH_LIST (default: the local GPU's compute capability);
#   2. runs every CUDA test of the repository (pytest -m cuda);
#   3. benchmarks the op on the GPU (tools/benchmark_op.py --device cuda) in fp32 and bf16.
# Everything is tee'd to a log. Usage:
#   tools/gpu_check.sh [LOG]        # default LOG: outputs/gpu_check_<date>.log
# Record the benchmark tables (they are also written as outputs/op_bench_cuda_*.md) in
# docs/benchmarks.md together with the GPU name printed below.
set -uo pipefail
cd "$(dirname "$0")/.."
stamp="$(date +%Y%m%d_%H%M%S)"
LOG="${1:-outputs/gpu_check_${stamp}.log}"
mkdir -p "$(dirname "$LOG")" outputs
exec > >(tee -a "$LOG") 2>&1

echo "== machine =="
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi not found"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu available', torch.cuda.is_available())"

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')" || {
    echo "no usable GPU: cannot pick TORCH_CUDA_ARCH_LIST" >&2; exit 1; }
fi
export TORCH_CUDA_ARCH_LIST

echo "== build (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST) =="
start=$(date +%s)
# --no-deps: keep the machine's own torch (the constraints pin may differ from it).
FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" python -m pip install -e . --no-build-isolation --no-deps || {
  echo "BUILD FAILED" >&2; exit 1; }
echo "build took $(( $(date +%s) - start )) s"
python -c "from sparse_detr.ops import available_backends; print('backends:', available_backends())"

status=0
echo "== CUDA tests (pytest -m cuda) =="
python -m pytest -m cuda -v -rs || status=1

echo "== op benchmark on the GPU =="
for dtype in float32 bfloat16; do
  python tools/benchmark_op.py --device cuda --dtype "$dtype" --repeats 10 \
    --markdown "outputs/op_bench_cuda_${dtype}_${stamp}.md" || status=1
done

echo "== done: status $status (0 = all passed); log in $LOG =="
exit $status
