#!/usr/bin/env bash
# The GPU check, for one CUDA GPU, in parts that each fit a short lease (the timeouts come from the first run, on
# one H200: docs/gpu.md):
#   gpu-layers                    in process: axolotl's LoRA kernels (real Triton) against the unfused layers, a knot;
#   gpu-qlora, gpu-bf16,          `axolotl train` runs of the GPU test suite (tests/gpu, `pytest -m gpu`), four at a
#   gpu-engines, gpu-deepspeed    time, by group (GPU_RUNS): 4-bit, 8-bit and bf16 chain adapters, COLA, FSDP2,
#                                 DeepSpeed ZeRO-2/3, axolotl's LoRA kernels on and off, merge-lora;
#   throughput-bf16               the throughput benchmark's llama3-8b preset in bf16, 2 repeats of 2 + 4 steps;
#   throughput-4bit               the same in 4-bit (QLoRA), one repeat.
# Each part has its own timeout; one that fails or times out is reported and the next one still runs.
# Logs, JUnit XML and the benchmark JSON go to OUT_DIR; a summary ends the output.
#
#   bash scripts/gpu_check.sh OUT_DIR [PART...]             # run the named parts (all without names), from any folder
#   bash scripts/gpu_check.sh --dry-run OUT_DIR [PART...]   # list the parts, their commands and timeouts; run nothing
#   PYTHON=/path/to/python                                 # the interpreter (default: .venv/bin/python, else python3)
set -uo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
if [[ $# -lt 1 ]]; then
    echo "usage: bash scripts/gpu_check.sh [--dry-run] OUT_DIR [PART...]" >&2
    exit 2
fi
OUT=$(realpath -m "$1")
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1

SHORT="--preset llama3-8b --override warmup=2 --override steps=4 --out $OUT"
# -P: the checkout's folder does not shadow the installed package (a wheel install has no source mapping)
PYTEST="$PYTHON -P -m pytest -m gpu -v -s -rs"
runs() {  # the axolotl-train tests for one group of runs
    echo "env GPU_RUNS=$2 $PYTEST tests/gpu/test_gpu_axolotl.py --junitxml=$OUT/$1.xml"
}
# name | timeout in seconds | command
ALL_PARTS=(
    "gpu-layers|150|$PYTEST tests/gpu/test_gpu_layers.py --junitxml=$OUT/gpu-layers.xml"
    "gpu-qlora|180|$(runs gpu-qlora qlora-linchain,qlora-linchain-unfused,qlora-moslora,qlora-cola)"
    "gpu-bf16|180|$(runs gpu-bf16 qlora-mtlora,8bit-moslora,bf16-linchain,bf16-moslora)"
    "gpu-engines|210|$(runs gpu-engines bf16-mtlora,bf16-cola,flash-linchain,fsdp2-linchain,fsdp2-cola)"
    "gpu-deepspeed|210|$(runs gpu-deepspeed zero2-moslora,zero3-linchain,zero2-cola,zero3-cola)"
    "throughput-bf16|170|$PYTHON bench/throughput.py $SHORT --override repeats=2"
    "throughput-4bit|130|$PYTHON bench/throughput.py $SHORT --override repeats=1 --quant 4bit"
)
PARTS=()
for part in "${ALL_PARTS[@]}"; do
    name=${part%%|*}
    if [[ $# -eq 0 || " $* " == *" $name "* ]]; then PARTS+=("$part"); fi
done
for wanted in "$@"; do
    if [[ " ${ALL_PARTS[*]%%|*} " != *" $wanted "* ]]; then
        echo "gpu_check: no part named $wanted" >&2
        exit 2
    fi
done

if [[ $DRY_RUN -eq 1 ]]; then
    echo "gpu_check (dry run): from $REPO, into $OUT"
    for part in "${PARTS[@]}"; do
        IFS='|' read -r name limit command <<<"$part"
        echo "$name (timeout ${limit}s): $command"
    done
    exit 0
fi

mkdir -p "$OUT"
cd "$REPO"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: $PYTHON sees no CUDA device; --dry-run lists what would run" >&2
    exit 2
fi
"$PYTHON" -c 'import torch; print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")' | tee "$OUT/device.txt"
declare -A STATUS
for part in "${PARTS[@]}"; do
    IFS='|' read -r name limit command <<<"$part"
    echo "== $name (timeout ${limit}s): $command"
    started=$SECONDS
    timeout --kill-after=10 "$limit" bash -c "$command" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) STATUS[$name]="passed" ;;
        124 | 137) STATUS[$name]="TIMED OUT after ${limit}s" ;;
        *) STATUS[$name]="FAILED (exit $rc)" ;;
    esac
    STATUS[$name]+=" in $((SECONDS - started))s; log: $OUT/$name.log"
    echo "   ${STATUS[$name]}"
done

echo
echo "== summary ($(cat "$OUT/device.txt"))"
for part in "${PARTS[@]}"; do
    name=${part%%|*}
    echo "$name: ${STATUS[$name]}"
done
grep -h "MEASURED" "$OUT"/gpu-*.log 2>/dev/null | sed "s/^.* MEASURED/MEASURED/"
for result in "$OUT"/throughput-*.json; do
    [[ -f "$result" ]] || continue
    echo
    echo "$(basename "$result"):"
    "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["table"])' "$result"
done
for part in "${PARTS[@]}"; do
    [[ "${STATUS[${part%%|*}]}" == passed* ]] || exit 1
done
