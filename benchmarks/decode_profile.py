"""Where one decode step's time goes: the engine's ops under torch.profiler, one stream.

Runs `--steps` decode steps of one request (a prompt of `--prompt-len` tokens) and reports, per step, the
self CPU time and call count of the top ops, next to the weight-streaming floor (the bytes of every weight
matrix at the bandwidth `benchmarks/roofline.py` measured). `--weights int8|int4` profiles a quantized
engine. `--compile` instead times `torch.compile(dynamic=True)` of the runner's decode step, as written and
with the KV-cache write as a custom op: compile time, ms per step, top ops, and whether the tokens match
eager. Writes JSON (and, without `--compile`, a PNG).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from swiftkv.engine import EngineConfig, LLMEngine, SamplingParams
from swiftkv.engine.compiled import kv_cache_writer
from swiftkv.engine.quantized import WEIGHT_FORMATS
from swiftkv.eval.data import data_file
from swiftkv.loading import DEFAULT_MODEL, load_model, load_tokenizer
from swiftkv.plotting import png_figure

from weights import streamed_weight_bytes


def decode_steps(engine: LLMEngine, prompt: list[int], steps: int, profiler=None) -> tuple[list[int], float]:
    """Prefill, then `steps` decode steps (under `profiler`, if given); returns the tokens and the mean seconds
    per decode step."""
    sequence = engine.add_request(prompt, SamplingParams(max_tokens=steps + 1, ignore_eos=True))
    while not sequence.output_token_ids:  # prefill (in chunks, for prompts over the step's budget), first token
        engine.step()
    with profiler or nullcontext():
        started = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        seconds = time.perf_counter() - started
    return sequence.output_token_ids, seconds / steps


def profile_ops(engine: LLMEngine, prompt: list[int], steps: int, top: int) -> tuple[list[dict], float]:
    """The top ops by self CPU time per decode step, and all ops' total per step."""
    decode_steps(engine, prompt, 8)  # warm-up
    profiler = profile(activities=[ProfilerActivity.CPU])
    decode_steps(engine, prompt, steps, profiler)
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1000 / steps
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / steps,
             "calls_per_step": e.count / steps} for e in events[:top]], total_ms


def write_as_aten_ops(cache: torch.Tensor, first: int, last: int, slots: torch.Tensor, states: torch.Tensor) -> None:
    """The cache write traced as the ATen ops `ModelRunner._write` runs eagerly: inductor functionalises the
    mutation of its graph input and copies the whole cache."""
    cache[first:last].index_copy_(2, slots, states)


def compile_probe(engine: LLMEngine, prompt: list[int], steps: int) -> dict:
    """torch.compile(dynamic=True) of the forward (`ModelRunner._forward`, every layer in one graph) against
    eager on the same engine: as written, and with the cache write as a custom op and guards evaluated only
    while warming up (`skip_guard_eval_unsafe`), each with its top ops per step."""
    reference, eager_seconds = decode_steps(engine, prompt, steps)
    runner, result = engine.runner, {"eager_ms_per_step": 1000 * eager_seconds}
    eager_forward = runner._forward
    writers = {"as_written": write_as_aten_ops, "custom_op_cache_write": kv_cache_writer(runner)}
    for variant, writer in writers.items():
        torch._dynamo.reset()
        runner.compiled_kv_write = writer  # what `ModelRunner._write` calls while compiling
        runner._forward = torch.compile(eager_forward, dynamic=True)
        started = time.perf_counter()
        decode_steps(engine, prompt, 8)
        row = {"compile_and_first_steps_s": time.perf_counter() - started}
        stance = torch.compiler.set_stance(skip_guard_eval_unsafe=True) if variant != "as_written" else nullcontext()
        with stance:
            tokens, compiled_seconds = decode_steps(engine, prompt, steps)
            profiler = profile(activities=[ProfilerActivity.CPU])
            decode_steps(engine, prompt, 8, profiler)
        events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
        row.update({"compiled_ms_per_step": 1000 * compiled_seconds, "tokens_equal": tokens == reference,
                    "top_ops_ms_per_step": {e.key[:60]: e.self_cpu_time_total / 1000 / 8 for e in events}})
        result[variant] = row
        runner._forward, runner.compiled_kv_write = eager_forward, None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--weights", default="auto", choices=WEIGHT_FORMATS)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--compile", action="store_true", help="time torch.compile of the decode step instead")
    parser.add_argument("--out", default="benchmarks/results/decode_profile")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype="bfloat16")
    engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_memory_gb=0.25, weights=args.weights))
    text_ids = tokenizer(data_file("wikitext2_test_raw.txt").read_text()[:20_000], add_special_tokens=False).input_ids
    prompt = text_ids[:args.prompt_len]
    bandwidth = json.loads(Path("benchmarks/results/roofline.json").read_text())["stream_gb_per_s"] * 1e9
    result = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "threads": torch.get_num_threads(),
              "settings": vars(args),
              "floor_ms_per_step": 1000 * streamed_weight_bytes(engine.runner.model) / bandwidth}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.compile:
        result["compile"] = compile_probe(engine, prompt, args.steps)
        print(json.dumps(result, indent=1))
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        return
    result["ops"], result["all_ops_ms_per_step"] = profile_ops(engine, prompt, args.steps, args.top)
    _, seconds = decode_steps(engine, prompt, args.steps)
    result["ms_per_step_unprofiled"] = 1000 * seconds  # minus all_ops: Python around the ops
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    with png_figure(out.with_suffix(".png"), figsize=(9, 4.5)) as (fig, axis):
        ops = result["ops"][::-1]
        axis.barh([o["op"] for o in ops], [o["self_ms_per_step"] for o in ops])
        axis.set_xlabel("self CPU ms per decode step (profiled)")
        axis.set_title(f"decode, 1 stream, {args.prompt_len}-token prompt, weights {args.weights}: "
                       f"{result['ms_per_step_unprofiled']:.1f} ms/step\n(ops {result['all_ops_ms_per_step']:.1f} ms, "
                       f"the rest Python; weight-streaming floor {result['floor_ms_per_step']:.1f} ms)", fontsize=9)
    print(json.dumps({k: v for k, v in result.items() if k != "ops"}, indent=1))
    for op in result["ops"]:
        print(f"{op['op']:>28}  {op['self_ms_per_step']:6.2f} ms  {op['calls_per_step']:6.0f} calls")


if __name__ == "__main__":
    main()
