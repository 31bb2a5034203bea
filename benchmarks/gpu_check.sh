#!/usr/bin/env bash
# The CUDA path and GPU timings in one run, on a machine with an NVIDIA GPU and PyTorch:
#   bash benchmarks/gpu_check.sh RESULTS_DIR
# 1. tests/test_cuda.py and tests/test_paged_attention.py (model, engine with and without CUDA graphs, the paged
#    attention kernel, least-squares start, distillation and eval on CUDA)
# 2. the engine (TTFT, decode 1 and 32 streams, serving 24 x 2000/64) on the Llama-3.1-8B shape, with and
#    without CUDA graphs, and SwiftKV with an fp8 KV cache (benchmarks/engine.py); then what the schedule
#    alone predicts for its serving run (benchmarks/serving_schedule.py)
# 3. prefill, base vs SwiftKV-50%, of a random-weight Llama-3.1-8B shape (benchmarks/prefill.py)
# 4. `swiftkv distill` under `accelerate launch` on a random-weight SmolLM2-135M-shaped checkpoint
# 5. prefill of the SmolLM2-135M shape
# `GPU_CHECK_STEPS="tests engine"` runs only those steps (names: tests engine prefill distill prefill-small).
# Each step has its own time limit and writes its own results, so one failure loses nothing else.
# Only this repository travels to a lent GPU machine, so it reads the tokenizer from .gpu/smollm2-135m-no-weights,
# wikitext from .gpu/data and, where the machine's transformers is not 4.57, wheels from .whl. Made here with:
#   mkdir -p .gpu/data && cp ../shared/data/wikitext2_test_raw.txt .gpu/data/
#   .venv/bin/python -c "from swiftkv.loading import *; from transformers import AutoConfig
#   s = resolve_model_source(DEFAULT_MODEL); d = '.gpu/smollm2-135m-no-weights'
#   AutoConfig.from_pretrained(s.name_or_path, gguf_file=s.gguf_file).save_pretrained(d)
#   load_tokenizer(DEFAULT_MODEL).save_pretrained(d)" && rm .gpu/smollm2-135m-no-weights/tokenizer.model
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2
# (the tokenizer.model that save_pretrained writes is the whole GGUF file; tokenizer.json is enough)
set -uo pipefail
results=${1:?usage: gpu_check.sh RESULTS_DIR}
mkdir -p "$results"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/benchmarks HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export SWIFTKV_DATA_DIR=$PWD/.gpu/data TOKENIZERS_PARALLELISM=false
tokenizer=.gpu/smollm2-135m-no-weights  # its config.json and tokenizer, no weights
steps=${GPU_CHECK_STEPS:-tests engine prefill distill prefill-small}
step() { echo "=== $* ($(date +%T))"; }
wanted() { [[ " $steps " == *" $1 "* ]]; }

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

if wanted tests; then
step tests on CUDA
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_paged_attention.py
fi

if wanted engine; then
step engine
timeout 420 python3 benchmarks/engine.py --model $tokenizer --random-weights llama-3.1-8b --device cuda \
    --systems engine-base engine-base-eager swiftkv-g1 swiftkv-g2 swiftkv-g1-fp8 \
    --ttft-lengths 2048 8192 16384 --decode-tokens 32 --decode-batch 32 --requests 24 --input-len 2000 \
    --output-len 64 --request-rate 1000 --parts ttft decode e2e serving --kv-cache-memory-gb 4 \
    --out "$results/engine_gpu_llama8b"
python3 benchmarks/serving_schedule.py --engine-json "$results/engine_gpu_llama8b.json" \
    --out "$results/serving_schedule_gpu_llama8b"
fi

if wanted prefill; then
step prefill, Llama-3.1-8B shape
timeout 120 python3 benchmarks/prefill.py --model $tokenizer --random-weights llama-3.1-8b --device cuda \
    --lengths 2048 8192 32768 --out "$results/prefill_gpu_llama8b"
fi

if wanted distill; then
step distill under accelerate launch
work=$(mktemp -d)
python3 - "$work" "$tokenizer" <<'EOF'
import json, shutil, sys
import torch
from shapes import random_model
work, tokenizer = sys.argv[1:]
random_model("smollm2-135m", torch.bfloat16, "cpu").save_pretrained(f"{work}/base")
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
    shutil.copy(f"{tokenizer}/{name}", f"{work}/base/{name}")
lines = [line.strip() for line in open(".gpu/data/wikitext2_test_raw.txt") if len(line) > 200]
with open(f"{work}/data.jsonl", "w") as out:
    out.writelines(json.dumps({"text": line}) + "\n" for line in lines)
EOF
python3 -m swiftkv.cli convert --model "$work/base" --out "$work/swiftkv" --num-key-value-layers 0.5 && \
timeout 150 python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    -m swiftkv.cli distill --model "$work/swiftkv" --data "$work/data.jsonl" --out "$work/distill" \
    --max-steps 60 --micro-batch-size 8 --eval-every 30 --save-every 30 --least-squares-blocks 64
cp "$work/distill/history.json" "$results/distill_gpu_history.json"
fi

if wanted prefill-small; then
step prefill, SmolLM2-135M shape
timeout 90 python3 benchmarks/prefill.py --model $tokenizer --random-weights smollm2-135m --device cuda \
    --lengths 2048 8192 32768 --out "$results/prefill_gpu_smollm2"
fi
step done
