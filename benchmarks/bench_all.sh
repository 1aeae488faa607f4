#!/usr/bin/env bash
# Rebuild benchmarks/RESULTS.md: every `vtprune bench` run below, its exact command and its table.
#   bash benchmarks/bench_all.sh            # CPU rows (about 3 minutes on 2 cores)
#   bash benchmarks/bench_all.sh cuda       # adds the 7b rows (needs a GPU with 40+ GB)
# Run it on an otherwise idle machine: the ratios are measured side by side, the absolute times are not
# comparable across machines.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
BENCH=${VTPRUNE:-.venv/bin/vtprune}
OUT=benchmarks/RESULTS.md
runs=(
  "--arch llava --size medium --method fastv --keep 64"
  "--arch llava --size medium --method cls --keep 64"
  "--arch llava --size medium --method fastv --keep 192"
  "--arch llava --size medium --method fastv --keep 64 --batch 4"
  "--arch llava-next --size medium --method fastv --keep 64 --repeats 3"
  "--arch qwen2-vl --size medium --method fastv --keep 64"
  "--arch qwen2-vl --size medium --method cls --keep 64"
  "--arch qwen2.5-vl --size medium --method cls --keep 64"
)
if [ "${1:-cpu}" = cuda ]; then
  runs+=(
    "--arch llava --size 7b --method fastv --keep 64 --device cuda --dtype float16"
    "--arch llava --size 7b --method cls --keep 64 --device cuda --dtype float16"
    "--arch llava --size 7b --method fastv --keep 64 --device cuda --dtype float16 --batch 8"
    "--arch qwen2-vl --size 7b --method fastv --keep 64 --device cuda --dtype bfloat16"
    "--arch qwen2.5-vl --size 7b --method cls --keep 64 --device cuda --dtype bfloat16"
  )
fi
{
  echo "# vtprune bench results"
  echo
  echo "Made by \`bash benchmarks/bench_all.sh${1:+ $1}\` on $(date -u +%Y-%m-%d) ($(nproc) CPU cores$(command -v nvidia-smi >/dev/null && echo ", $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)")): random-weight"
  echo "models of real architectures (\`vtprune/eval/bench.py\` has the shapes), pruned and unpruned runs"
  echo "interleaved in one process. **limit** is the ratio of analytic prefill FLOPs (the speedup pruning could"
  echo "give at best) and, for the KV cache, the ratio when exactly the dropped tokens leave the layers after"
  echo "the prune point. vtprune's own time (scoring, compaction) is measured on separate profiled prefills."
  for args in "${runs[@]}"; do
    echo
    echo "## \`vtprune bench $args\`"
    echo
    # shellcheck disable=SC2086
    $BENCH bench $args
  done
} > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "wrote $OUT"
