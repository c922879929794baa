#!/usr/bin/env bash
# The CPU measurements of docs/performance.md: 2 torch threads, niced so that other work on the machine keeps
# priority. About 10 minutes in all; stage 4 builds the full-size random SD-1.5 models (about 4.4 GiB in fp32).
#   bash benchmarks/run_cpu.sh [smoke|tiny|diffsegmenter|full|all|compile]   (default: all; compile is extra:
#   inductor compiles for minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=2
# OpenMP threads that sleep instead of spinning at barriers: on a shared, oversubscribed CPU, spinning made the
# same tiny FA-Seg call 4x slower in wall time (docs/performance.md). Set before torch starts.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
out=${BENCH_OUT:-benchmarks/results}
mkdir -p "$out"
bench() { nice -n 10 python -m ovss.cli bench --device cpu --threads 2 "$@"; }
stage=${1:-all}

if [[ $stage == smoke || $stage == all ]]; then  # CI-safe: tiny models at 128², seconds
  bench -m faseg --models tiny --resolution 128 --batch-sizes 1 --repeats 1 --warmup 0 -o "$out/cpu_tiny_smoke.json"
fi
if [[ $stage == tiny || $stage == all ]]; then  # optimized vs naive FA-Seg, tiny models at their native 256²
  bench -m faseg --models tiny --batch-sizes 1,4 --repeats 5 --warmup 1 -o "$out/cpu_tiny_faseg.json"
fi
if [[ $stage == diffsegmenter || $stage == all ]]; then  # 10 classes: one batched pass vs one pass per class
  bench -m diffsegmenter --models tiny --classes 10 --batch-sizes 1 --repeats 3 --warmup 1 \
        -o "$out/cpu_tiny_diffsegmenter.json"
fi
if [[ $stage == full || $stage == all ]]; then  # full-size shapes, 512², batch 1, fp32: time and peak RSS (< 8 GiB)
  bench -m faseg --models random --dtype float32 --batch-sizes 1 --repeats 2 --warmup 0 --no-naive \
        -o "$out/cpu_random_faseg_fp32.json"
fi
if [[ $stage == compile ]]; then  # torch.compile of the UNet, tiny models (not part of "all")
  bench -m faseg --models tiny --batch-sizes 1,4 --repeats 5 --warmup 1 --compile --no-naive \
        -o "$out/cpu_tiny_faseg_compile.json"
fi
