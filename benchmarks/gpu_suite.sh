#!/usr/bin/env bash
# The checks that need a GPU, in one run (≤ 8 minutes on one H100): `mmscope check` on a random model of
# LLaVA-1.5-7B geometry in bfloat16; the knockout, patch and end-to-end benchmarks on the device; the distributed
# test with CUDA visible. Prints one summary line per item at the end; every item's full output is kept in $LOGS.
#
#   bash benchmarks/gpu_suite.sh                 # on a GPU machine: 7B geometry, bfloat16, cuda
#   bash benchmarks/gpu_suite.sh --device cpu    # a reduced run anywhere: width 64, 8 layers, float32
set -uo pipefail
cd "$(dirname "$0")/.."
device=cuda
if [[ "${1:-}" == "--device" ]]; then device="$2"; fi
LOGS="${LOGS:-$(mktemp -d)}"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
if [[ "$device" == cuda ]]; then
  model=(--geometry 7b --dtype bfloat16 --layers 32)
  check_dtype=bfloat16
else
  model=(--geometry small --width 64 --layers 8 --dtype float32)
  check_dtype=float32
fi
summary=()

item() {  # item NAME COMMAND...: run it, keep its log, remember its last line (or $PICK's) and how long it took
  local name="$1"; shift
  local started=$SECONDS
  "$@" >"$LOGS/$name.log" 2>&1
  local status=$?
  local last
  last="$(grep -E "${PICK:-.}" "$LOGS/$name.log" | grep -v '^\s*$' | tail -n 1)"
  summary+=("$(printf '%-12s %-4s %4ds  %s' "$name" "$([[ $status == 0 ]] && echo ok || echo FAIL)" \
    $((SECONDS - started)) "$last")")
}

folder="$LOGS/random-llava"
item build python benchmarks/random_model.py --out "$folder" "${model[@]}"
PICK='checks pass' item check mmscope check --model "$folder" --device "$device" --dtype "$check_dtype" --examples 3 \
  --json "$LOGS/check.json"
item knockout python benchmarks/knockout_sweep.py --device "$device" "${model[@]}" --examples 2
item patch python benchmarks/patch_sweep.py --device "$device" "${model[@]}" --examples 2
item end_to_end python benchmarks/end_to_end.py --device "$device" "${model[@]}"
item distributed python -m pytest -q tests/test_distributed.py

echo
echo "GPU suite on $device ($(python -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")')); logs in $LOGS"
printf '%s\n' "${summary[@]}"
