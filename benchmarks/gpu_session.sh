#!/usr/bin/env bash
# One GPU session of issue 11, as is: every stage on CUDA (device_check), then the SD-1.5-shaped routed step
# against the floor, eager (B = 1, 4, 16, 32; K = 2, 3) and compiled (B = 1, 4; K = 2: each shape compiles,
# about a minute per model on a GPU). Writes JSON (and each step's stderr) under $OUT. The steps' time limits
# add up to 560 s, under one 600 s device command; with the machine's start it fits a 15-minute budget.
# Run from the repository root:  OUT=/some/dir bash benchmarks/gpu_session.sh
set -u
OUT="${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MSDDA_HOME="${MSDDA_HOME:-$(mktemp -d)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())" > "$OUT/torch.txt" 2>&1

run() {  # name, seconds, command...: JSON on stdout to $OUT/name.json, stderr to $OUT/name.log
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
    echo "$name: exit $?" | tee -a "$OUT/summary.txt"
}

run device_check 140 "$PY" benchmarks/device_check.py --device cuda --dtype fp16 --json
run compose_speed_sd15_eager 120 "$PY" benchmarks/compose_speed.py --unet sd15 --device cuda --dtype fp16 \
    --modes eager --batches 1,4,16,32 --models 2,3 --repeats 15 --json
run compose_speed_sd15_compiled 300 "$PY" benchmarks/compose_speed.py --unet sd15 --device cuda --dtype fp16 \
    --modes compiled --batches 1,4 --models 2 --repeats 15 --json
