"""A decode step's matrix products at 1-128 rows: oneDNN's bf16 GEMM, ATen's GEMV, and our kernel
(swiftkv/engine/small_batch_linear.py), against the hardware floor; then the engine's decode steps with the
kernel and without it, in alternating rounds (this machine's speed drifts by tens of percent from minute to
minute, so only numbers taken side by side are compared).

Runs every weight matrix of the model in the order a decode step does (30 layers' fused q|k|v, o, fused
gate|up and down, then lm_head; 269 MB for SmolLM2, so each pass streams them from memory, as in the engine)
on `rows` rows of activations. The floor is the larger of the weights' bytes at the streaming bandwidth and the
products' FLOPs at the bf16 GEMM throughput of prefill shapes, both from benchmarks/results/roofline.json.
The engine part times eager decode steps (ms per step, the median over rounds) of the base model and
SwiftKV-50% for 1 and 16 streams at 128 and ~2000 keys (the serving benchmark's decode). Writes JSON and a PNG.

  python benchmarks/small_batch_linear.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from swiftkv.convert import convert_to_swiftkv
from swiftkv.engine import EngineConfig, LLMEngine, SamplingParams, small_batch_linear
from swiftkv.eval.data import data_file
from swiftkv.engine.model_runner import onednn
from swiftkv.engine.quantized import fuse_projections
from swiftkv.loading import DEFAULT_MODEL, load_model, load_tokenizer
from swiftkv.plotting import png_figure

from roofline import timed

ATEN_MAX_ROWS = 4  # ATen's GEMV path (oneDNN off) loops over rows: beyond a few it is far behind


def step_weights(model) -> list[torch.Tensor]:
    """The weights a decode step multiplies by, in its order."""
    weights = []
    for layer in fuse_projections(model).model.layers:
        weights += [layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight, layer.mlp.gate_up_proj.weight,
                    layer.mlp.down_proj.weight]
    return [w.detach().contiguous() for w in weights + [model.lm_head.weight]]


def products(weights: list[torch.Tensor], rows: int, multiply) -> None:
    inputs = {width: torch.randn(rows, width, dtype=torch.bfloat16) for width in {w.shape[1] for w in weights}}
    for weight in weights:
        multiply(inputs[weight.shape[1]], weight)


ENGINE_CASES = {"1 stream, 128 keys": (1, 128), "16 streams, 128 keys": (16, 128),
                "16 streams, 2000 keys": (16, 2000)}


def engine(args, kind: str, kernel: bool, tokenizer) -> LLMEngine:
    """An engine on its own copy of the model (the kernel swaps the copy's linears), kernel on or off."""
    model = load_model(args.model, dtype="bfloat16")
    if kind == "swiftkv":
        model = convert_to_swiftkv(model, model.config.num_hidden_layers // 2, 1)
    with mock.patch.dict(os.environ, {small_batch_linear.DISABLE_VARIABLE: "1" if kernel else "0"}):
        return LLMEngine(model, tokenizer, EngineConfig(kv_cache_memory_gb=1.0))


def decode_step_ms(engine: LLMEngine, prompts: list[list[int]], steps: int) -> float:
    """Median ms of `steps` decode steps of every prompt at once, timed once all of them are prefilled."""
    prefill_steps = -(-sum(map(len, prompts)) // engine.config.max_prefill_tokens)
    sequences = [engine.add_request(prompt, SamplingParams(max_tokens=prefill_steps + steps + 1, ignore_eos=True))
                 for prompt in prompts]
    while engine.scheduler.waiting:
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
        assert engine.last_step.decode_rows == len(prompts) and not engine.last_step.prompt_tokens
    for sequence in sequences:
        engine.abort(sequence)
    return 1e3 * statistics.median(times)


def alternating_medians(engines: dict, prompts: list[list[int]], rounds: int, steps: int) -> dict:
    """Each engine's median decode-step ms, timed in `rounds` alternating rounds (side by side, as this
    machine's speed drifts)."""
    times = {name: [] for name in engines}
    for _ in range(rounds):
        for name, running in engines.items():
            times[name].append(decode_step_ms(running, prompts, steps))
    return {name: statistics.median(ms) for name, ms in times.items()}


def engine_rounds(args) -> dict:
    tokenizer = load_tokenizer(args.model)
    text = tokenizer(data_file("wikitext2_test_raw.txt").read_text()[:400_000], add_special_tokens=False).input_ids
    results = {}
    for kind in ("base", "swiftkv"):
        engines = {kernel: engine(args, kind, kernel, tokenizer) for kernel in (False, True)}
        for case, (streams, keys) in ENGINE_CASES.items():
            prompts = [text[i * 997:i * 997 + keys] for i in range(streams)]
            medians = alternating_medians(engines, prompts, args.engine_rounds, args.engine_steps)
            row = {"without_kernel_ms": medians[False], "kernel_ms": medians[True]}
            row["speedup"] = row["without_kernel_ms"] / row["kernel_ms"]
            results.setdefault(kind, {})[case] = row
            print(kind, case, {k: round(v, 2) for k, v in row.items()}, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 96, 128])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--engine-rounds", type=int, default=5)
    parser.add_argument("--engine-steps", type=int, default=16, help="decode steps timed per round")
    parser.add_argument("--roofline", default="benchmarks/results/roofline.json")
    parser.add_argument("--out", default="benchmarks/results/small_batch_linear")
    args = parser.parse_args()
    if not small_batch_linear.available():
        raise SystemExit("the kernel needs a CPU with AVX512-BF16 and a C++ compiler")

    weights = step_weights(load_model(args.model, dtype="bfloat16"))
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    roofline = json.loads(Path(args.roofline).read_text())
    bandwidth, gemm_flops = roofline["stream_gb_per_s"] * 1e9, roofline["matmul_gflops"] * 1e9
    systems = {"onednn": lambda x, w: F.linear(x, w), "aten": lambda x, w: F.linear(x, w),
               "kernel": lambda x, w: torch.ops.swiftkv_cpu.small_batch_linear(x, w, None)}
    results = {"model": args.model, "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
               "weight_bytes": weight_bytes, "stream_gb_per_s": bandwidth / 1e9, "gemm_gflops": gemm_flops / 1e9,
               "ms": {name: {} for name in systems}, "floor_ms": {}}
    for rows in args.rows:
        flops = 2 * rows * sum(w.numel() for w in weights)
        results["floor_ms"][rows] = 1e3 * max(weight_bytes / bandwidth, flops / gemm_flops)
        for name, multiply in systems.items():
            if name == "aten" and rows > ATEN_MAX_ROWS:
                continue
            with onednn(enabled=name != "aten"):
                seconds = timed(lambda: products(weights, rows, multiply), args.repeats)
            results["ms"][name][rows] = 1e3 * seconds
        print(rows, {name: round(ms.get(rows, float("nan")), 2) for name, ms in results["ms"].items()},
              "floor", round(results["floor_ms"][rows], 2), flush=True)
    results["engine_decode_step"] = engine_rounds(args)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    with png_figure(out.with_suffix(".png"), 1, 2, figsize=(13, 4.5)) as (_, (axes, engine_axes)):
        labels = {"onednn": "oneDNN bf16 GEMM", "aten": "ATen GEMV (oneDNN off)", "kernel": "swiftkv kernel"}
        for name, ms in results["ms"].items():
            axes.plot(list(ms), list(ms.values()), marker="o", label=labels[name])
        floor = results["floor_ms"]
        axes.plot(list(floor), list(floor.values()), "k--", label="floor (bytes / bandwidth, FLOPs / GEMM peak)")
        axes.set_xscale("log", base=2)
        axes.set_xlabel("rows (decoding sequences)")
        axes.set_ylabel("ms per decode step's products")
        axes.set_title(f"{args.model}: every weight once, {results['threads']} threads")
        axes.legend()
        cases = list(ENGINE_CASES)
        for offset, (kind, rows) in zip((-0.2, 0.2), results["engine_decode_step"].items()):
            positions = [i + offset for i in range(len(cases))]
            engine_axes.bar([p - 0.1 for p in positions], [rows[c]["without_kernel_ms"] for c in cases], 0.2,
                            label=f"{kind}: PyTorch products", alpha=0.5)
            engine_axes.bar([p + 0.1 for p in positions], [rows[c]["kernel_ms"] for c in cases], 0.2,
                            label=f"{kind}: kernel")
        engine_axes.set_xticks(range(len(cases)), cases)
        engine_axes.set_ylabel("ms per eager decode step (median)")
        engine_axes.set_title("engine decode steps, alternating rounds")
        engine_axes.legend()
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
