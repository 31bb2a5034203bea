"""Weight-only int8 and int4 against the weights as loaded (bf16): decode speed and what each costs in agreement.

For the base model and SwiftKV-50% (an untrained conversion: speed does not depend on its weights), each in
bf16, with `--weights int8` and with `--weights int4`, in one run:
  decode      engine ms per output token with 1 stream, eager and with the compiled one-stream step
              (`compile_decode`), and output tokens/s with `--decode-batch` streams (WikiText-2 prompts of
              `--prompt-len` tokens, `--decode-tokens` tokens each);
  floor       the bytes of weights one decode step streams (projections, lm_head, SingleInputKV), at the
              memory bandwidth `benchmarks/roofline.py` measured;
  agreement   top-1 agreement of the quantized model with the bf16 model's greedy answers to the vicuna_bench
              prompts (teacher-forced: both read the bf16 answer; `--answer-tokens` per prompt).
Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from swiftkv.convert import convert_to_swiftkv
from swiftkv.engine import EngineConfig, LLMEngine, SamplingParams
from swiftkv.engine.quantized import Int4WeightOnlyLinear, Int8WeightOnlyLinear, fuse_projections, quantize_weights
from swiftkv.eval.data import data_file
from swiftkv.loading import DEFAULT_MODEL, load_model, load_tokenizer
from swiftkv.plotting import png_figure

from engine import engine_decode_ms


def streamed_weight_bytes(model) -> int:
    """Bytes one decode step reads from weight matrices (embedding lookups are one row: left out)."""
    total = 0
    for module in model.modules():
        if isinstance(module, Int8WeightOnlyLinear):
            total += module.weight_int8.numel() + module.scales.numel() * module.scales.element_size()
        elif isinstance(module, Int4WeightOnlyLinear):  # the packed matrix; its nibble copy serves prefill only
            total += module.weight_int4pack.numel() + module.scales_and_zeros.nbytes
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def greedy_answers(model, tokenizer, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_memory_gb=0.5, max_num_seqs=32))
    sequences = [engine.add_request(p, SamplingParams(max_tokens=tokens)) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [s.output_token_ids for s in sequences]


@torch.inference_mode()
def agreement(model, prompts: list[list[int]], answers: list[list[int]]) -> float:
    """Share of answer tokens that `model`'s argmax predicts, reading prompt + answer."""
    matches = total = 0
    for prompt, answer in zip(prompts, answers):
        logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
        matches += (logits.argmax(-1) == torch.tensor(answer)).sum().item()
        total += len(answer)
    return matches / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--weights", nargs="+", default=["auto", "int8", "int4"])
    parser.add_argument("--out", default="benchmarks/results/weights")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    base = load_model(args.model, dtype="bfloat16")
    half = -(-base.config.num_hidden_layers // 2)
    models = {"base": base, "swiftkv": convert_to_swiftkv(base, half, 1)}
    text_ids = tokenizer(data_file("wikitext2_test_raw.txt").read_text()[:200_000], add_special_tokens=False).input_ids
    decode_prompts = [text_ids[i * 509:i * 509 + args.prompt_len] for i in range(args.decode_batch)]
    chat_prompts = [tokenizer.apply_chat_template([{"role": "user", "content": json.loads(line)["prompt"]}],
                                                  add_generation_prompt=True, tokenize=True)
                    for line in data_file("prompts_vicuna_bench.jsonl").read_text().splitlines()]
    bandwidth = json.loads(Path("benchmarks/results/roofline.json").read_text())["stream_gb_per_s"] * 1e9
    results = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "threads": torch.get_num_threads(),
               "settings": vars(args), "memory_gb_per_s": bandwidth / 1e9, "systems": {}}
    for name, model in models.items():
        answers = greedy_answers(model, tokenizer, chat_prompts, args.answer_tokens)
        for weights in args.weights:
            print(f"== {name}, weights {weights}", flush=True)
            variant = fuse_projections(model if weights == "auto" else copy.deepcopy(model))
            quantize_weights(variant, weights)
            engine = LLMEngine(variant, tokenizer, EngineConfig(kv_cache_memory_gb=0.25, max_num_seqs=32,
                                                                max_prefill_tokens=sum(map(len, decode_prompts))))
            engine_decode_ms(engine, decode_prompts[:1], 8)  # warm-up
            one = engine_decode_ms(engine, decode_prompts[:1], args.decode_tokens)
            many = engine_decode_ms(engine, decode_prompts, args.decode_tokens)
            compiled = LLMEngine(variant, tokenizer, EngineConfig(kv_cache_memory_gb=0.25, compile_decode=True))
            engine_decode_ms(compiled, decode_prompts[:1], 8)  # warm-up
            one_compiled = engine_decode_ms(compiled, decode_prompts[:1], args.decode_tokens)
            weight_bytes = streamed_weight_bytes(variant)
            results["systems"][f"{name}-{weights}"] = {
                "decode_ms_per_token": one["ms_per_token_per_stream"],
                "decode_ms_per_token_compiled": one_compiled["ms_per_token_per_stream"],
                "compile_seconds": compiled.runner.compile_seconds,
                f"output_tokens_per_s_{args.decode_batch}_streams": many["output_tokens_per_second"],
                "streamed_weight_bytes": weight_bytes, "floor_ms_per_token": 1000 * weight_bytes / bandwidth,
                "top1_agreement_with_bf16": agreement(variant, chat_prompts, answers)}
            print(results["systems"][f"{name}-{weights}"], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"), args.decode_batch)


def plot(results: dict, path: Path, streams: int) -> None:
    names = list(results["systems"])
    rows = [results["systems"][n] for n in names]
    with png_figure(path, 1, 2, figsize=(11, 4)) as (fig, (latency, throughput)):
        positions = range(len(names))
        latency.bar([p - 0.2 for p in positions], [r["decode_ms_per_token"] for r in rows], width=0.4,
                    label="engine, eager")
        latency.bar([p + 0.2 for p in positions], [r["decode_ms_per_token_compiled"] for r in rows], width=0.4,
                    label="engine, compiled step")
        latency.set_xticks(list(positions), names)
        latency.plot(names, [r["floor_ms_per_token"] for r in rows], "k_", markersize=30, label="weight-streaming floor")
        latency.set_ylabel("ms per output token, 1 stream")
        latency.legend()
        throughput.bar(names, [r[f"output_tokens_per_s_{streams}_streams"] for r in rows])
        throughput.set_ylabel(f"output tokens/s, {streams} streams")
        for axis in (latency, throughput):
            axis.tick_params(axis="x", rotation=20)
        for index, row in enumerate(rows):
            throughput.annotate(f"agree {row['top1_agreement_with_bf16']:.3f}", (index, 0), ha="center",
                                va="bottom", fontsize=8, color="white")
        fig.suptitle("Weight-only int8 / int4 vs bf16 (SmolLM2-135M, 2-core CPU; agreement: top-1 with the bf16 "
                     "answers)")


if __name__ == "__main__":
    main()
