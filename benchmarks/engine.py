"""Engine speed: TTFT, decode and prompt-heavy serving throughput, SwiftKV vs base, in one run.

Systems (same weights, dtype and threads):
  hf            transformers generate on the base model (prefill = one forward with logits_to_keep=1)
  engine-base   this engine on the base model
  engine-base-eager  the same without CUDA graphs (on a GPU: what graph replay of decode steps saves)
  <engine system>-compiled  with decode steps through torch.compile (CPU; `compile_decode`), e.g.
                engine-base-compiled, swiftkv-g1-compiled; its start-up compile time is reported
  <engine system>-int8, -fp8  with that 8-bit KV cache (as `--kv-cache-dtype`, for this system only), e.g.
                swiftkv-g1-fp8: twice the tokens in the same budget
  swiftkv-g1    this engine on SwiftKV-50% (num_key_value_layers=15 of 30, no AcrossKV)
  swiftkv-g2    this engine on SwiftKV with AcrossKV groups of 2 (num_key_value_layers=16: (30-l) % 2 == 0)
  llamacpp-bf16 llama.cpp on a BF16 GGUF of the same weights, llamacpp-q4_1 on the shipped Q4_1 GGUF
                (llama-cpp-python, optional: benchmarks/llamacpp.py; skipped with a message without it)
(for another depth L: l = L/2, rounded up for groups of 2). `--weights int8|int4` quantizes the engine's.
Every system also runs one request end to end (`--e2e` tokens in / out, greedy): what a user waits.
TTFT, one-stream decode and end to end are each the median of `--repeats` runs; serving runs once.
Serving replays Poisson arrivals of `--requests` requests (`--input-len` in / `--output-len` out) into the
engine in-process, under one fixed KV-cache budget; metrics are named as in `vllm bench serve`, plus the
paper's normalized throughput: the base model's FLOPs for the tokens served, per second (`base_model_flops`).
It runs twice: at `--request-rate` (a steady load: TTFT and time per output token under it; a system faster
than the load finishes soon after the last arrival, so its tokens/s says little) and at
`--saturated-request-rate` (the requests arrive faster than any system serves them: tokens/s is capacity).
`--parts` picks which measurements run (default: all).
Speed does not depend on the SwiftKV weights, so an untrained conversion is measured; `--random-weights SHAPE`
times a random-weight model of that shape (on a GPU, where only the repository travels; `--model` then only
supplies the tokenizer). Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from swiftkv.convert import convert_to_swiftkv
from swiftkv.engine import EngineConfig, LLMEngine, SamplingParams
from swiftkv.engine.llm_engine import request_output
from swiftkv.engine.measure import engine_ttft, poisson_arrivals, serve_engine, throughput_metrics
from swiftkv.engine.model_runner import KV_CACHE_DTYPES
from swiftkv.engine.quantized import WEIGHT_FORMATS
from swiftkv.eval.data import data_file
from swiftkv.loading import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model_source
from swiftkv.plotting import png_figure

import llamacpp
from prefill import device_name
from shapes import SHAPES, random_model, swiftkv_layer_counts


def greedy_token(output) -> torch.Tensor:
    """The next token `[1, 1]`, waited for: a server must have it on the host to stream it."""
    token = output.logits[:, -1:].argmax(-1)
    token.item()
    return token


@torch.inference_mode()
def hf_ttft(model, prompt: list[int], repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        greedy_token(model(torch.tensor([prompt], device=model.device), logits_to_keep=1, use_cache=True))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def engine_decode_ms(engine: LLMEngine, prompts: list[list[int]], tokens: int) -> dict:
    """Decode speed of `prompts` as streams, `tokens` each, timed from their first tokens: the engine must
    prefill every prompt in one step (its `max_prefill_tokens`), or a later prompt step would be timed too."""
    sequences = [engine.add_request(p, SamplingParams(max_tokens=tokens, ignore_eos=True)) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    if len({s.token_times[0] for s in sequences}) > 1:
        raise ValueError(f"{len(prompts)} prompts of {sum(map(len, prompts))} tokens took more than one step: raise "
                         "max_prefill_tokens so that decode steps are timed alone")
    per_stream = [1000 * (s.token_times[-1] - s.token_times[0]) / (len(s.token_times) - 1) for s in sequences]
    span = max(s.token_times[-1] for s in sequences) - min(s.token_times[0] for s in sequences)
    return {"ms_per_token_per_stream": statistics.mean(per_stream),
            "output_tokens_per_second": len(prompts) * (tokens - 1) / span}


@torch.inference_mode()
def hf_generate_s(model, prompt: list[int], tokens: int) -> float:
    """Seconds of a greedy `generate` of exactly `tokens` new tokens (EOS ignored), read back to the host."""
    input_ids = torch.tensor([prompt], device=model.device)
    start = time.perf_counter()
    model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens, do_sample=False,
                   eos_token_id=None, pad_token_id=0).tolist()
    return time.perf_counter() - start


def hf_decode_ms(model, prompt: list[int], tokens: int) -> dict:
    prefill = hf_generate_s(model, prompt, 1)
    per_token = (hf_generate_s(model, prompt, tokens) - prefill) / (tokens - 1)
    return {"ms_per_token_per_stream": 1000 * per_token, "output_tokens_per_second": 1 / per_token}


def engine_e2e_s(engine: LLMEngine, prompt: list[int], tokens: int) -> float:
    sequence = engine.add_request(prompt, SamplingParams(max_tokens=tokens, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    return request_output(sequence).latency_s


def median_run(measure, repeats: int, key: str = "ms_per_token_per_stream"):
    """The median of `repeats` runs of `measure()` (a number, or a dict ranked by `key`): one short timing on a
    shared machine can land on another tenant's burst."""
    runs = sorted((measure() for _ in range(repeats)), key=lambda run: run[key] if isinstance(run, dict) else run)
    return runs[len(runs) // 2]


DECODE_PROMPT_TOKENS = 128  # each decode stream's context: its prompt, prefilled before decode is timed
PARTS = ("ttft", "decode", "e2e", "serving", "saturated")
SERVING_RUNS = {"serving": "serving", "saturated": "serving_saturated"}  # part -> its key in a system's row


def llamacpp_row(system: str, args, text_ids: list[int]) -> dict:
    source = resolve_model_source(args.model)
    if not source.gguf_file:
        raise SystemExit(f"{system} needs a GGUF model (e.g. {DEFAULT_MODEL}), got {args.model!r}")
    gguf_path = Path(source.name_or_path) / source.gguf_file
    if system == "llamacpp-bf16":
        gguf_path = llamacpp.bf16_gguf(gguf_path, Path.home() / ".cache" / "swiftkv" / f"{gguf_path.stem}.bf16.gguf")
    context = max(max(args.ttft_lengths), sum(args.e2e)) + 64
    runner = llamacpp.LlamaCpp(gguf_path, context, torch.get_num_threads())
    row = {"gguf": gguf_path.name}
    if "ttft" in args.parts:
        row["ttft_s"] = {n: runner.ttft(text_ids[:n], args.repeats) for n in args.ttft_lengths}
    if "decode" in args.parts:
        row["decode_1"] = median_run(lambda: runner.decode_ms(text_ids[:DECODE_PROMPT_TOKENS], args.decode_tokens),
                                     args.repeats)
    if "e2e" in args.parts:
        row["e2e_s"] = median_run(lambda: runner.generate(text_ids[:args.e2e[0]], args.e2e[1])[1][-1], args.repeats)
    return row


@torch.inference_mode()
def serve_hf(model, prompts: list[list[int]], arrivals: list[float], output_len: int) -> dict:
    """First come, first served, one request at a time (what a plain `generate` loop gives)."""
    records, clock = [], 0.0
    for arrival, prompt in zip(arrivals, prompts):
        clock = max(clock, arrival)
        input_ids = torch.tensor([prompt], device=model.device)
        start = time.perf_counter()
        output = model(input_ids, logits_to_keep=1, use_cache=True)
        past, token = output.past_key_values, greedy_token(output)
        token_times = [time.perf_counter() - start]
        for _ in range(output_len - 1):
            output = model(token, past_key_values=past, use_cache=True)
            past, token = output.past_key_values, greedy_token(output)
            token_times.append(time.perf_counter() - start)
        records.append({"ttft": clock - arrival + token_times[0], "token_times": token_times})
        clock += token_times[-1]
    ttft = [r["ttft"] for r in records]
    tpot = [(r["token_times"][-1] - r["token_times"][0]) / (output_len - 1) for r in records]
    itl = [b - a for r in records for a, b in zip(r["token_times"], r["token_times"][1:])]
    duration = clock - arrivals[0]
    return throughput_metrics(ttft, tpot, itl, duration, len(prompts), sum(map(len, prompts)), output_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--ttft-lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=2000)
    parser.add_argument("--output-len", type=int, default=100)
    parser.add_argument("--request-rate", type=float, default=1.0, help="Poisson arrivals per second")
    parser.add_argument("--saturated-request-rate", type=float, default=16.0,
                        help="arrivals per second for the capacity run")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--e2e", type=int, nargs=2, default=[2048, 128], metavar=("IN", "OUT"))
    parser.add_argument("--kv-cache-memory-gb", type=float, default=0.25)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="the engine systems' KV cache (int8 / fp8: 8-bit codes with a scale per token and head)")
    parser.add_argument("--weights", default="auto", choices=WEIGHT_FORMATS, help="the engine systems' weights")
    parser.add_argument("--systems", nargs="+", default=["hf", "engine-base", "swiftkv-g1", "swiftkv-g2",
                                                         "llamacpp-bf16", "llamacpp-q4_1"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-weights", choices=sorted(SHAPES), help="time a random-weight model of this shape")
    parser.add_argument("--out", default="benchmarks/results/engine")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    if args.random_weights:
        base = random_model(args.random_weights, getattr(torch, args.dtype), args.device)
    else:
        base = load_model(args.model, dtype=args.dtype, device=args.device)
    text_ids = tokenizer(data_file("wikitext2_test_raw.txt").read_text()[:400_000], add_special_tokens=False).input_ids
    serve_prompts = [text_ids[i * 997:i * 997 + args.input_len] for i in range(args.requests)]
    decode_prompts = [text_ids[i * 500:i * 500 + DECODE_PROMPT_TOKENS] for i in range(args.decode_batch)]
    arrivals = poisson_arrivals(args.requests, args.request_rate)
    arrival_times = {"serving": arrivals,
                     "saturated": poisson_arrivals(args.requests, args.saturated_request_rate)}
    layers = swiftkv_layer_counts(base.config.num_hidden_layers)
    models = {"engine-base": base, "swiftkv-g1": convert_to_swiftkv(base, layers[1], 1),
              "swiftkv-g2": convert_to_swiftkv(base, layers[2], 2)}
    served_flops = args.requests * base_model_flops(base.config, args.input_len, args.output_len)
    results = {"settings": vars(args), "date": time.strftime("%Y-%m-%d"), "device": device_name(args.device),
               "threads": torch.get_num_threads(), "systems": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for system in args.systems:
        print(f"== {system}", flush=True)
        row = {}
        if system.startswith("llamacpp"):
            if not llamacpp.available():
                print(f"skipping {system}: llama-cpp-python is not installed (see benchmarks/llamacpp.py)")
                continue
            row = llamacpp_row(system, args, text_ids)
        elif system == "hf":
            if "ttft" in args.parts:
                row["ttft_s"] = {n: hf_ttft(base, text_ids[:n], args.repeats) for n in args.ttft_lengths}
            if "decode" in args.parts:
                row["decode_1"] = hf_decode_ms(base, text_ids[:DECODE_PROMPT_TOKENS], args.decode_tokens)
            if "e2e" in args.parts:
                row["e2e_s"] = hf_generate_s(base, text_ids[:args.e2e[0]], args.e2e[1])
            for part, key in SERVING_RUNS.items():
                if part in args.parts:
                    row[key] = serve_hf(base, serve_prompts, arrival_times[part], args.output_len)
        else:
            engine = None  # the last system's
            free_memory(args.device)
            model_name, options = engine_variant(system)
            options = {"kv_cache_dtype": args.kv_cache_dtype, **options}
            config = EngineConfig(dtype=args.dtype, kv_cache_memory_gb=args.kv_cache_memory_gb,
                                  max_prefill_tokens=max(*args.ttft_lengths, sum(map(len, decode_prompts))),
                                  weights=args.weights, **options)
            engine = LLMEngine(models[model_name], tokenizer, config)
            row["kv_cache_capacity_tokens"] = engine.capacity_tokens
            if engine.runner.compiled_decode is not None:
                row["compile_seconds"] = engine.runner.compile_seconds
            engine_ttft(engine, text_ids[:64], 1)  # warm-up
            if "ttft" in args.parts:
                row["ttft_s"] = {n: engine_ttft(engine, text_ids[:n], args.repeats) for n in args.ttft_lengths}
            if "decode" in args.parts:
                row["decode_1"] = median_run(
                    lambda: engine_decode_ms(engine, decode_prompts[:1], args.decode_tokens), args.repeats)
                row[f"decode_{args.decode_batch}"] = engine_decode_ms(engine, decode_prompts, args.decode_tokens)
            if "e2e" in args.parts:
                row["e2e_s"] = median_run(lambda: engine_e2e_s(engine, text_ids[:args.e2e[0]], args.e2e[1]),
                                          args.repeats)
            for part, key in SERVING_RUNS.items():
                if part in args.parts:  # a fresh engine: the default prefill budget, an empty cache
                    engine = None
                    free_memory(args.device)
                    engine = LLMEngine(models[model_name], tokenizer, EngineConfig(
                        dtype=args.dtype, weights=args.weights, kv_cache_memory_gb=args.kv_cache_memory_gb,
                        **options))
                    row[key] = serve_engine(engine, serve_prompts, arrival_times[part], args.output_len)
        for key in SERVING_RUNS.values():
            if key in row:
                row[key]["normalized_tflops_per_s"] = served_flops / row[key]["duration_s"] / 1e12
        print(json.dumps(row, indent=1), flush=True)
        results["systems"][system] = row
        add_ratios(results)
        out.with_suffix(".json").write_text(json.dumps(results, indent=2))  # each system as it finishes
    plot(results, out.with_suffix(".png"))
    print(json.dumps(results["ratios"], indent=1))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def free_memory(device: str) -> None:
    """Collect engines no longer referenced and give their KV cache and CUDA graphs' memory back, so that the
    next engine is timed alone, not beside them."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


ENGINE_VARIANTS = {"-eager": {"cuda_graphs": False}, "-compiled": {"compile_decode": True},
                   "-int8": {"kv_cache_dtype": "int8"}, "-fp8": {"kv_cache_dtype": "fp8"}}


def engine_variant(system: str) -> tuple[str, dict]:
    """An engine system's model ("engine-base", "swiftkv-g1", ...) and the `EngineConfig` options of its
    variant suffix, if any."""
    for suffix, options in ENGINE_VARIANTS.items():
        if system.endswith(suffix):
            return system.removesuffix(suffix), options
    return system, {}


def base_model_flops(config, input_len: int, output_len: int) -> float:
    """FLOPs the base model spends on one request of `input_len` prompt tokens and `output_len` generated ones:
    2 per weight per token (the projections, MLPs and lm_head) and 4 x head dim x query heads per layer per
    attended key (QK^T and PV, causal), as the paper counts normalized throughput."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, kv = config.hidden_size, config.num_key_value_heads * head_dim
    per_layer = hidden * (config.num_attention_heads * head_dim) * 2 + hidden * kv * 2 \
        + 3 * hidden * config.intermediate_size
    weights = config.num_hidden_layers * per_layer + hidden * config.vocab_size
    tokens = input_len + output_len - 1  # the last token is sampled, never run
    keys = tokens * (tokens + 1) / 2      # token t attends t + 1 keys
    return 2 * weights * tokens + 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * keys


def add_ratios(results: dict) -> None:
    """Each system against the engine's base (TTFT, serving) and against llama.cpp BF16 (one request end to
    end), all from this run."""
    systems = results["systems"]
    base, llama = systems.get("engine-base"), systems.get("llamacpp-bf16")
    ratios = {}
    for name, row in systems.items():
        ratio = {}
        if base is not None and name != "engine-base":
            if "ttft_s" in row and "ttft_s" in base:
                ratio["ttft_speedup_vs_engine_base"] = {n: base["ttft_s"][n] / row["ttft_s"][n] for n in row["ttft_s"]}
            for key in SERVING_RUNS.values():
                if key in row and key in base:
                    ratio[f"{key}_throughput_vs_engine_base"] = (row[key]["total_token_throughput"]
                                                                 / base[key]["total_token_throughput"])
        if llama is not None and name != "llamacpp-bf16" and "e2e_s" in row and "e2e_s" in llama:
            ratio["e2e_speedup_vs_llamacpp_bf16"] = llama["e2e_s"] / row["e2e_s"]
        ratios[name] = ratio
    results["ratios"] = ratios


def plot(results: dict, path: Path) -> None:
    systems = results["systems"]
    with png_figure(path, 1, 3, figsize=(15, 4)) as (fig, axes):
        lengths = [str(n) for n in results["settings"]["ttft_lengths"]]
        width = 0.8 / len(systems)
        s = results["settings"]
        for i, (name, row) in enumerate(systems.items()):
            if "ttft_s" in row:
                axes[0].bar([j + i * width for j in range(len(lengths))], list(row["ttft_s"].values()), width,
                            label=name)
            if "decode_1" in row:
                axes[1].bar(i, row["decode_1"]["ms_per_token_per_stream"], label=name)
            # llama.cpp runs one request at a time: not a serving system here
            for offset, (key, rate) in zip((-0.2, 0.2), (("serving", s["request_rate"]),
                                                          ("serving_saturated", s.get("saturated_request_rate")))):
                if key in row:
                    axes[2].bar(i + offset, row[key]["total_token_throughput"], 0.4,
                                color="tab:blue" if key == "serving" else "tab:orange",
                                label=f"{rate} req/s" if i == 0 else None)
        axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(lengths))], lengths)
        axes[0].set_xlabel("prompt tokens")
        axes[0].set_ylabel("TTFT (s, median)")
        axes[1].set_xticks(range(len(systems)), list(systems), rotation=20, ha="right")
        axes[1].set_ylabel("decode ms/token, 1 stream")
        axes[2].set_xticks(range(len(systems)), list(systems), rotation=20, ha="right")
        axes[2].set_ylabel(f"total tokens/s ({s['input_len']} in / {s['output_len']} out)")
        for axis in axes:
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=8)
            if not axis.has_data():  # a part left out by --parts
                axis.clear()
                axis.set_axis_off()
                axis.text(0.5, 0.5, "not measured in this run", ha="center", transform=axis.transAxes)
        model = f"random-weight {s['random_weights']}" if s.get("random_weights") else s["model"]
        device = results.get("device", f"{results['threads']} CPU threads")
        fig.suptitle(f"{model} {s['dtype']}, {device}, KV budget {s['kv_cache_memory_gb']} GB")


if __name__ == "__main__":
    main()
