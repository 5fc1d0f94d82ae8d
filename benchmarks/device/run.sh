#!/bin/bash
# The benchmark suite on a lent accelerator machine, offline; results in $OUT (gpu.log, JSON).
#
# Installs the wheels of benchmarks/device/wheels.sh into a private folder (not over the
# machine's torch), copies the library beside them, then, most important first (a run cut
# short by its time limit still returns what it finished): where the GPU waits at 4,096 tokens
# (benchmarks/device/idle.py: the eager and the compiled reduction timed interleaved, then
# profiled); statistics at FLUX.1-dev's 28 steps; the timing table at 1,024 and 4,096 tokens;
# peak memory at 4,096. About 6 minutes on an H100/H200. Operator counts with torch's own
# synchronisation reports: `python3 benchmarks/run.py --ops ... --tokens 1024` (not run here).
#
#   bash benchmarks/device/run.sh [WHEELS]    # default .whl
set -o pipefail
source "$(dirname "$0")/env.sh" "${1:-.whl}" || exit 3
log="$out/gpu.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
quiet() { grep -v -E "Loading|Writing model|torchvision|USDT|_warn_once|Profiler clears"; }
wide=(--device cuda --dtype bfloat16 --width 3072 --blocks 2 4)
# Where the GPU waits, and the eager against the compiled reduction, interleaved (idle.py).
python3 benchmarks/device/idle.py "${wide[@]}" --tokens 4096 --reps 9 --out "$out/idle" \
    --cases plain nnsight_empty access_only naive_save_all stats stats_fused 2>&1 | quiet | tee -a "$log"
# FLUX.1-dev's schedule (28 steps): the fixed cost of a run spread as on the real model.
python3 benchmarks/run.py "${wide[@]}" --tokens 4096 --steps 28 --reps 5 --no-memory \
    --cases plain nnsight_empty stats stats_fused naive_save_all \
    --json "$out/gpu_time28.json" 2>&1 | quiet | tee -a "$log"
python3 benchmarks/run.py "${wide[@]}" --tokens 1024 4096 --reps 7 --no-memory \
    --json "$out/gpu_time.json" 2>&1 | quiet | tee -a "$log"
python3 benchmarks/run.py "${wide[@]}" --tokens 4096 --reps 3 --cases plain plain_images stats \
    stats_fused naive_save_all plain_pair transport_batched_2row --json "$out/gpu_mem.json" 2>&1 \
    | quiet | tee -a "$log"
