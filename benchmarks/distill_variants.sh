#!/usr/bin/env bash
# Recipe variants side by side: the default build's conversion and cached teacher corpus, one
# `swiftkv distill` per variant (the default recipe plus that variant's flags), scored on the same held-out
# prompts. Meant for a GPU, where a 400-step run takes about a minute instead of 40:
#   bash benchmarks/distill_variants.sh BASE_MODEL RESULTS_JSON
# BASE_MODEL is what `swiftkv convert --model` takes (the SmolLM2 GGUF file by default). With SWIFTKV_CACHE
# pointing at a copy of this machine's ~/.cache/swiftkv, the teacher corpus is the one the CPU runs used.
# RESULTS_JSON is rewritten after each variant with every held-out curve so far; a PNG of them ends the run.
set -uo pipefail
model=${1:-smollm2-135m-instruct}
results=${2:?usage: distill_variants.sh BASE_MODEL RESULTS_JSON}
work=$(mktemp -d)
swiftkv="python3 -m swiftkv.cli"
$swiftkv convert --model "$model" --out "$work/converted" --num-key-value-layers 0.5 || exit 1

variants=(
    "default|"
    "micro-batch 2, 800 steps|--micro-batch-size 2 --max-steps 800"
    "lr 2e-3|--learning-rate 2e-3"
    "hidden MSE 1.0|--hidden-loss-weight 1.0"
    "micro-batch 8, 200 steps, lr 2e-3|--micro-batch-size 8 --max-steps 200 --learning-rate 2e-3"
    "4x steps (1600)|--max-steps 1600"
)
for index in "${!variants[@]}"; do
    variant=${variants[$index]}
    name=${variant%%|*}
    flags=${variant#*|}
    echo "=== $name: $flags ($(date +%T))"
    # shellcheck disable=SC2086  # the flags are words
    $swiftkv distill --model "$work/converted" --out "$work/variant-$index" --save-every 100000 $flags
    python3 benchmarks/distill_variants_report.py add "$results" "$name" "$flags" "$work/variant-$index/history.json"
done
python3 benchmarks/distill_variants_report.py plot "$results"
