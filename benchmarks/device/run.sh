#!/bin/bash
# The benchmark suite on a lent accelerator machine, offline; results in $OUT (gpu.log, JSON).
#
# Installs the wheels of benchmarks/device/wheels.sh into a private folder (not over the
# machine's torch), copies the library beside them, then, most important first (a run cut
# short by its time limit still returns what it finished): the timing table at 1,024 and 4,096
# tokens; where the GPU waits (benchmarks/device/idle.py: the statistics with each reduction
# kernel, timed interleaved, then profiled); peak memory at 4,096; operator counts with torch's
# own synchronisation reports. About 6 minutes on an H100/H200.
#
#   bash benchmarks/device/run.sh [WHEELS]    # default .whl
set -o pipefail
source "$(dirname "$0")/env.sh" "${1:-.whl}" || exit 3
log="$out/gpu.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
quiet() { grep -v -E "Loading|Writing model|torchvision|USDT|_warn_once|Profiler clears"; }
wide=(--device cuda --dtype bfloat16 --width 3072 --blocks 2 4)
python3 benchmarks/run.py "${wide[@]}" --tokens 1024 4096 --reps 7 --no-memory \
    --json "$out/gpu_time.json" 2>&1 | quiet | tee -a "$log"
python3 benchmarks/device/idle.py "${wide[@]}" --tokens 1024 4096 --reps 7 --out "$out/idle" \
    --cases plain nnsight_empty access_only stats stats_fused 2>&1 | quiet | tee -a "$log"
python3 benchmarks/run.py "${wide[@]}" --tokens 4096 --reps 3 --cases plain plain_images stats \
    naive_save_all plain_pair transport_batched_2row --json "$out/gpu_mem.json" 2>&1 | quiet | tee -a "$log"
python3 benchmarks/run.py --ops "${wide[@]}" --tokens 1024 --json "$out/gpu_ops.json" 2>&1 | quiet | tee -a "$log"
