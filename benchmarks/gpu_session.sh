#!/bin/bash
# One GPU lease, one command: issue 12's FP8 measurements, then issue 11's (bench_gpu.py), then
# optionally the main job on the GPU. Each step is time-boxed so the whole fits SESSION_S seconds.
#   PYTHONPATH=. [PARTS=train,decode_mid] bash benchmarks/gpu_session.sh [fp8] [bench] [r1]   # default: fp8 bench
# Steps run in the order given. Env: SESSION_S (whole run, default 450), FP8_S (gpu_fp8.py's budget, 60),
# BENCH_S (bench_gpu.py's budget; default what is left less 30 s), PARTS (bench_gpu.py --parts),
# TRAIN_MODES (bench_gpu.py --train-modes), GPU_FP8_MODES (gpu_fp8.py's training-step modes).
# (On the device the copy of .git may be older than the tree: env.log's commit can then be stale.)
# Everything lands in $OUT: gpu_fp8.json, bench_gpu.json, r1-zero's report.json/.md, and one log per step.
set -u
OUT=${OUT:-.}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1 NANOSEEK_NO_PROGRESS=1 NANOSEEK_CACHE_DIR=/tmp/nscache
SESSION_S=${SESSION_S:-450}
T0=$(date +%s)
left() { l=$(( SESSION_S - ($(date +%s) - T0) )); echo $(( l > 1 ? l : 1 )); }
steps=${*:-fp8 bench}
for s in $steps; do
  case $s in fp8|bench|r1) ;; *) echo "gpu_session.sh: unknown step '$s' (steps: fp8 bench r1)" >&2; exit 2 ;; esac
done
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > "$OUT/env.log" 2>&1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$OUT/env.log" 2>&1
git describe --always --dirty >> "$OUT/env.log" 2>/dev/null   # -dirty: the tree differs from that commit
for s in $steps; do
  case $s in
    fp8)   GPU_FP8_BUDGET_S=${FP8_S:-60} timeout $(( ${FP8_S:-60} + 120 )) python3 benchmarks/gpu_fp8.py > "$OUT/fp8.log" 2>&1 ;;
    bench) b=${BENCH_S:-$(( $(left) > 60 ? $(left) - 30 : 30 ))}; timeout $(( b + 25 )) python3 benchmarks/bench_gpu.py --budget $b --parts "${PARTS:-}" \
             ${TRAIN_MODES:+--train-modes "$TRAIN_MODES"} > "$OUT/bench.log" 2>&1 ;;
    r1)    timeout $(( $(left) > 10 ? $(left) - 5 : 5 )) python3 -m nanoseek r1-zero --out /tmp/r1 > "$OUT/r1.log" 2>&1
           cp /tmp/r1/report.json /tmp/r1/report.md "$OUT/" 2>/dev/null ;;
  esac
  echo "$s done at $(( $(date +%s) - T0 )) s" >> "$OUT/env.log"
done
