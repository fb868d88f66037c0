#!/usr/bin/env bash
# One GPU session of issue 11, in order of what is still open, inside one time budget (BUDGET seconds, default
# 540):
#   1. the environment (versions; stops here if the project does not import);
#   2. the gpu-marked tests (every stage on CUDA against the CPU; compiled routing against eager);
#   3. compose_speed --unet sd15, compiled (torch.compile + CUDA graphs): floor and routed merged, K = 2,
#      B = 1, 4 (each shape compiles: about a minute per model);
#   4. compose_speed --unet sd15, eager: both floors, routed merged / routed LoRA / per-model plan, K = 2, 3,
#      B = 1, 4, 16, 32;
#   5. device_check: every stage and every composition method on CUDA in fp16.
# Each step gets what is left of the budget (at most its own limit). Under $OUT: summary.txt (the card, the
# versions, each step's exit and time), logs.txt (every step's stderr, progress rows included: a step killed at
# its limit keeps the rows it printed) and one NAME.out per step: seven files, for machines that return at most
# eight. Run from the repository root:
#   OUT=/some/dir bash benchmarks/gpu_session.sh
set -u
OUT="${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${BUDGET:-540}"
START=$(date +%s)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MSDDA_HOME="${MSDDA_HOME:-$(mktemp -d)}"

run() {  # name, limit seconds, command...: stdout to $OUT/name.out, stderr appended to $OUT/logs.txt
    local name=$1 limit=$2 left
    shift 2
    left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -le 5 ]; then
        echo "$name: skipped (budget spent)" | tee -a "$OUT/summary.txt"
        return 1
    fi
    local began=$(date +%s)
    echo "=== $name" >> "$OUT/logs.txt"
    timeout "$limit" "$@" > "$OUT/$name.out" 2>> "$OUT/logs.txt"
    local rc=$?
    echo "$name: exit $rc in $(($(date +%s) - began)) s (limit $limit)" | tee -a "$OUT/summary.txt"
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/summary.txt" 2>&1
run environment 60 "$PY" -c "
import torch, diffusers, peft, transformers, accelerate, pydantic
import composition.batched, composition.engine, training.reference.embedded, training.trainer
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name())
print('diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__,
      'accelerate', accelerate.__version__, 'pydantic', pydantic.__version__)
" || { tail -20 "$OUT/logs.txt"; exit 1; }
cat "$OUT/environment.out" | tee -a "$OUT/summary.txt"

run gpu_tests 150 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
tail -5 "$OUT/gpu_tests.out"
run speed_compiled 240 "$PY" benchmarks/compose_speed.py --unet sd15 --device cuda --dtype fp16 \
    --modes compiled --batches 1,4 --models 2 --routings merged --repeats 10 --json
grep '^{"mode": "compiled"' "$OUT/logs.txt" | tee -a "$OUT/summary.txt"  # the rows, also when killed
run speed_eager 120 "$PY" benchmarks/compose_speed.py --unet sd15 --device cuda --dtype fp16 --modes eager \
    --batches 1,4,16,32 --models 2,3 --routings merged,lora,per_model --repeats 10 --json
run device_check 60 "$PY" benchmarks/device_check.py --device cuda --dtype fp16 --json
cat "$OUT/summary.txt"
