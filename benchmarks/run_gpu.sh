#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, for a session with a lent H100/H200 (benchmarks/README.md says
# how to carry the diffusers wheel there). One stage per device call keeps each under the 10-minute limit:
#   bash benchmarks/run_gpu.sh smoke|faseg|parity|compile|diffsegmenter
# Reports go to $OUT (the device tool's folder that comes back), else benchmarks/results.
set -uo pipefail
cd "$(dirname "$0")/.."
case ${1:-} in
  smoke|faseg|parity|compile|diffsegmenter) ;;
  *) echo "usage: bash benchmarks/run_gpu.sh smoke|faseg|parity|compile|diffsegmenter" >&2; exit 2 ;;
esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then  # the device image has no diffusers
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
out=${OUT:-benchmarks/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
bench() { python3 -m ovss.cli bench --device cuda "$@"; }

case ${1:-} in
  smoke)  # tiny models on the GPU: the harness, and naive == optimized in fp32 (about a minute)
    bench -m faseg --models tiny --dtype float32 --batch-sizes 1,4 --repeats 3 --warmup 1 -o "$out/gpu_tiny_fp32.json" ;;
  faseg)  # the 10x target: full-size shapes, fp16 (the paper's dtype), batch 1/4/16 vs the naive per-image version
    bench -m faseg --models random --dtype float16 --batch-sizes 1,4,16 --repeats 5 --warmup 2 \
          -o "$out/gpu_random_faseg_fp16.json" ;;
  parity)  # identical outputs at full size in fp32 (max abs score difference < 1e-3), and bf16's speed
    bench -m faseg --models random --dtype float32 --batch-sizes 1 --repeats 2 --warmup 1 \
          -o "$out/gpu_random_faseg_fp32.json"
    bench -m faseg --models random --dtype bfloat16 --batch-sizes 1,16 --repeats 5 --warmup 2 --no-naive \
          -o "$out/gpu_random_faseg_bf16.json" ;;
  compile)  # torch.compile of the UNet (the first warm-up call compiles: minutes)
    bench -m faseg --models random --dtype float16 --batch-sizes 1,16 --repeats 5 --warmup 2 --no-naive --compile \
          -o "$out/gpu_random_faseg_fp16_compile.json" ;;
  diffsegmenter)  # the 5x target: 10 classes in one batched pass vs one pass per class
    bench -m diffsegmenter --models random --dtype float16 --classes 10 --batch-sizes 1,4 --repeats 5 --warmup 2 \
          -o "$out/gpu_random_diffsegmenter_fp16.json" ;;
esac
