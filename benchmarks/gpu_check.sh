#!/usr/bin/env bash
# One prepared check for a lent GPU machine (one H100/H200, its own torch/transformers, no network):
# at most about 8 minutes, five parts, each under its own `timeout`; a failing or killed part does not
# stop the others. Each part writes $OUT/gpu_<part>.md (default benchmarks/results): nvidia-smi -L,
# versions, a pass/fail summary line and its table (benchmarks/gpu_check.py says what (a)-(d) check,
# benchmarks/attention_kernels_check.py what (e) checks).
#
#   bash benchmarks/gpu_check.sh                          # on the GPU machine, from a copy of the repo
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh --device cpu --quick   # CPU smoke test of the python parts
#
# Extra arguments go to every part (e.g. --models llava --methods fastv). Nothing is installed: the
# checkout is put on PYTHONPATH. PYTHON picks the interpreter (default: python, else python3).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
export OUT
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-$(command -v python || command -v python3)}
START=$(date +%s)
SUMMARY=()

run_part() {  # name, seconds: benchmarks/gpu_check.py <name>, or the script $PART_SCRIPT when set
  local name=$1 limit=$2 rc
  shift 2
  local cmd=("$PY" benchmarks/gpu_check.py "$name")
  if [ -n "${PART_SCRIPT:-}" ]; then cmd=("$PY" "$PART_SCRIPT"); fi
  echo "=== gpu_check $name (timeout ${limit}s) ==="
  # the python part stops starting new cases 25 s before its timeout, so it can write its summary
  timeout -k 10 "$limit" "${cmd[@]}" --out "$OUT" --budget-s $((limit - 25)) "$@" \
    2>&1 | tee "$OUT/gpu_$name.log" | tail -n 40
  rc=${PIPESTATUS[0]}
  if [ ! -s "$OUT/gpu_$name.md" ]; then  # the part died before its first report
    { echo "# gpu_check $name"; echo; echo "**summary: 0 pass, 1 error** (rc $rc, no report written)"; echo;
      echo '```'; tail -n 60 "$OUT/gpu_$name.log"; echo '```'; } > "$OUT/gpu_$name.md"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    printf '\n**killed by the %ss timeout (rc %s)**: the rows above are what finished.\n' "$limit" "$rc" >> "$OUT/gpu_$name.md"
  fi
  SUMMARY+=("$name rc=$rc: $(grep -m1 '^\*\*summary' "$OUT/gpu_$name.md" || echo '?')")
}

{ nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"; "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(), "| transformers", transformers.__version__)'; } | tee "$OUT/gpu_env.txt"

run_part presets 105 "$@"   # (a) every preset x tiny model x bf16/fp16: finite, keep-all == unpatched, drop == mask
run_part sync 75 "$@"       # (b) decode steps under torch.cuda.set_sync_debug_mode("error") / "warn"
run_part bench 145 "$@"     # (c) vtprune bench --size 7b: llava, qwen2-vl x fastv/cls/visionzip x batch 1, 8
run_part compact 95 "$@"    # (d) benchmarks/bench_compact.py: compact + recycle kernels vs torch
# (e) pruning under the real flash_attention_2 against sdpa with the same weights (keep-all, drop == mask,
# staged, pre-LLM, generate), where flash_attn imports; compiled flex_attention is a manual run
# (python benchmarks/attention_kernels_check.py --impls flex_attention): its compiles would not fit here
if "$PY" -c "import flash_attn" >/dev/null 2>&1; then
  PART_SCRIPT=benchmarks/attention_kernels_check.py run_part attention 45 --impls flash_attention_2 "$@"
else
  echo "=== gpu_check attention: skipped (flash_attn not importable) ==="
  { echo "# gpu_check attention"; echo; echo "**summary: 1 skipped** (flash_attn not importable: no flash_attention_2 to check)"; } > "$OUT/gpu_attention.md"
  SUMMARY+=("attention: $(grep -m1 '^\*\*summary' "$OUT/gpu_attention.md")")
fi

echo
echo "=== gpu_check done in $(( $(date +%s) - START )) s; reports in $OUT ==="
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/gpu_summary.txt"
