#!/usr/bin/env bash
# The whole GPU check in one command, for one CUDA GPU (an H100: about 8 minutes):
#   1. the GPU test suite (tests/gpu, `pytest -m gpu`): 4-bit, 8-bit and bf16 chain adapters, COLA, DeepSpeed,
#      FSDP2 and axolotl's LoRA kernels, through `axolotl train` on a small random Llama;
#   2. the throughput benchmark's llama3-8b preset in bf16, shortened to 2 repeats of 2 + 4 steps;
#   3. the same in 4-bit (QLoRA), one repeat (quantizing the 8-layer model takes its own minute).
# Each part has its own timeout; one that fails or times out is reported and the next one still runs.
# Logs, JUnit XML and the benchmark JSON go to OUT_DIR; a summary ends the output.
#
#   bash scripts/gpu_check.sh OUT_DIR             # run it (from any folder)
#   bash scripts/gpu_check.sh --dry-run OUT_DIR   # list the parts, their commands and timeouts; run nothing
#   PYTHON=/path/to/python                       # the interpreter (default: .venv/bin/python, else python3)
set -uo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: bash scripts/gpu_check.sh [--dry-run] OUT_DIR" >&2
    exit 2
fi
OUT=$(realpath -m "$1")
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1

SHORT="--preset llama3-8b --override warmup=2 --override steps=4 --out $OUT"
# name | timeout in seconds | command; 510 s in all
PARTS=(
    "gpu-tests|210|$PYTHON -m pytest -m gpu tests/gpu -v -s --junitxml=$OUT/gpu-tests.xml"
    "throughput-bf16|150|$PYTHON bench/throughput.py $SHORT --override repeats=2"
    "throughput-4bit|150|$PYTHON bench/throughput.py $SHORT --override repeats=1 --quant 4bit"
)

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
grep -h "^MEASURED" "$OUT/gpu-tests.log" 2>/dev/null
for result in "$OUT"/throughput-*.json; do
    [[ -f "$result" ]] || continue
    echo
    echo "$(basename "$result"):"
    "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["table"])' "$result"
done
for part in "${PARTS[@]}"; do
    [[ "${STATUS[${part%%|*}]}" == passed* ]] || exit 1
done
