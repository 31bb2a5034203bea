"""The engine's KV-cache formats on CPU, side by side: bf16 and int8, both tiled (csrc/bf16_tiles.h).

  kernel    decode attention per layer (SmolLM2-135M's heads: 9 query heads over 3 KV heads of 64), one row and
            `--rows` rows of `--contexts` keys, each call on another layer's slots (read from memory, as a
            decode step does), and one row whose keys stay in cache (the instructions, not the bytes); the
            floor is the row's K/V bytes (codes and their bf16 scales for 8-bit caches) at `--bandwidth` GB/s;
  engine    eager decode steps of the base model, 1 and 16 streams at ~2000 keys, one engine per format, in
            alternating rounds (this machine's speed drifts by tens of percent from minute to minute);
  quality   what the int8 cache costs: `--windows` WikiText-2 windows of `--context` tokens prefilled, then
            the next `--forced` tokens of the text fed one decode step at a time (teacher forcing, so every
            format sees the same tokens); top-1 agreement of int8's next-token choice with the bf16 cache's,
            and the mean KL divergence from it.
Writes JSON and a PNG.

  python benchmarks/kv_cache_formats.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from swiftkv.engine import EngineConfig, LLMEngine, SamplingParams, paged_attention_cpu
from swiftkv.engine.model_runner import encode_kv
from swiftkv.engine.sequence import Chunk, Sequence
from swiftkv.eval.data import data_file
from swiftkv.loading import DEFAULT_MODEL, load_model, load_tokenizer
from swiftkv.plotting import png_figure

from decode_attention import GROUP, HEAD_DIM, KV_HEADS, LAYERS, one_thread, timed
from small_batch_linear import alternating_medians

FORMATS = ("auto", "int8")  # the engine's kv_cache_dtype: auto is the model's bf16
LABELS = {"auto": "bf16", "int8": "int8"}
ENGINE_CASES = {"1 stream, 2000 keys": (1, 2000), "16 streams, 2000 keys": (16, 2000)}


def stored(states: torch.Tensor, kv_cache_dtype: str) -> tuple[torch.Tensor, dict]:
    """`[..., slots, d]` bf16 states as the engine stores them (int8: codes and their bf16 scales)."""
    if kv_cache_dtype == "auto":
        return states, {}
    codes, scale = encode_kv(states, kv_cache_dtype)
    return codes, {"scale": scale}


def kernel_rounds(args) -> dict:
    longest = max(args.contexts)
    slots = args.rows * longest
    keys, values = (torch.randn(LAYERS, KV_HEADS, slots, HEAD_DIM, dtype=torch.bfloat16) for _ in range(2))
    caches = {}
    for kv_cache_dtype in FORMATS:
        (k, k_extra), (v, v_extra) = stored(keys, kv_cache_dtype), stored(values, kv_cache_dtype)
        caches[kv_cache_dtype] = (paged_attention_cpu.tile_cache(k, values=False),
                                  paged_attention_cpu.tile_cache(v, values=True),
                                  k_extra.get("scale"), v_extra.get("scale"))
    queries = torch.randn(args.rows, KV_HEADS * GROUP, HEAD_DIM, dtype=torch.bfloat16)
    row_slots = torch.stack([torch.arange(r * longest, (r + 1) * longest) for r in range(args.rows)])
    tables = (row_slots[:, ::16] // 16).int()
    results = {}
    for context in args.contexts:
        counts = torch.full((args.rows,), context, dtype=torch.int32)

        def attend(kv_cache_dtype, layer, rows):
            k, v, k_scale, v_scale = caches[kv_cache_dtype]
            scales = {} if k_scale is None else {"k_scale": k_scale[layer], "v_scale": v_scale[layer]}
            return paged_attention_cpu.paged_decode_attention(queries[:rows], k[layer], v[layer], tables[:rows],
                                                              counts[:rows], 16, HEAD_DIM ** -0.5, tiled=True,
                                                              **scales)

        torch.testing.assert_close(attend("int8", 0, args.rows).float(), attend("auto", 0, args.rows).float(),
                                   atol=0.1, rtol=0.1)
        row = {}
        for kv_cache_dtype in FORMATS:
            name = LABELS[kv_cache_dtype]
            bytes_per_key = 2 * KV_HEADS * (HEAD_DIM * (2 if kv_cache_dtype == "auto" else 1) +
                                            (0 if kv_cache_dtype == "auto" else 2))
            floor = 1e6 * context * bytes_per_key / (args.bandwidth * 1e9)
            row[name] = {
                "one row": timed(lambda layer: attend(kv_cache_dtype, layer, 1), args.repeats),
                "one row, keys in cache": timed(lambda layer: attend(kv_cache_dtype, 0, 1), args.repeats),
                "one row, keys in cache, 1 thread": one_thread(
                    lambda: timed(lambda layer: attend(kv_cache_dtype, 0, 1), args.repeats)),
                f"{args.rows} rows": timed(lambda layer: attend(kv_cache_dtype, layer, args.rows), args.repeats),
                "one row, floor": floor, f"{args.rows} rows, floor": args.rows * floor}
        results[context] = row
        print("kernel", context, {name: {k: round(v, 1) for k, v in r.items()} for name, r in row.items()},
              flush=True)
    return results


def engine(args, kv_cache_dtype: str, tokenizer) -> LLMEngine:
    model = load_model(args.model, dtype="bfloat16")
    return LLMEngine(model, tokenizer, EngineConfig(kv_cache_memory_gb=1.0, kv_cache_dtype=kv_cache_dtype))


def engine_rounds(args, engines: dict, text: list[int]) -> dict:
    results = {}
    for case, (streams, keys) in ENGINE_CASES.items():
        prompts = [text[i * 997:i * 997 + keys] for i in range(streams)]
        medians = alternating_medians(engines, prompts, args.engine_rounds, args.engine_steps)
        results[case] = {LABELS[kv_cache_dtype]: ms for kv_cache_dtype, ms in medians.items()}
        print("engine", case, {k: round(v, 2) for k, v in results[case].items()}, flush=True)
    return results


def forced_logits(engine: LLMEngine, prompt: list[int], forced: list[int]) -> torch.Tensor:
    """Float32 logits at the prompt's last position and after each forced token but the last, `[len(forced), V]`:
    the prompt as one chunk, then one decode row per forced token."""
    sequence = Sequence(list(prompt), SamplingParams(max_tokens=len(forced) + 1))
    engine.blocks.reserve(sequence, len(prompt) + len(forced))
    logits = [engine.runner.run([Chunk(sequence, 0, len(prompt))])[0]]
    for token in forced[:-1]:
        sequence.token_ids.append(token)
        logits.append(engine.runner.run([Chunk(sequence, len(sequence) - 1, len(sequence))])[0])
    engine.blocks.free(sequence)
    return torch.stack(logits).float()


def quality(args, engines: dict, text: list[int]) -> dict:
    step = len(text) // args.windows
    windows = [text[i * step:i * step + args.context + args.forced] for i in range(args.windows)]
    logits = {kv_cache_dtype: [forced_logits(running, w[:args.context], w[args.context:]) for w in windows]
              for kv_cache_dtype, running in engines.items()}
    reference = torch.cat(logits["auto"])
    ours = torch.cat(logits["int8"])
    kl = F.kl_div(ours.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    results = {"int8": {"top1_agreement": (ours.argmax(-1) == reference.argmax(-1)).float().mean().item(),
                        "mean_kl": kl.mean().item(), "positions": len(ours)}}
    print("quality", results, flush=True)
    return results


def plot(results: dict, path: Path, rows: int) -> None:
    with png_figure(path, 1, 2, figsize=(13, 4.5)) as (_, (kernel_axes, engine_axes)):
        contexts = list(results["kernel_us_per_layer"])
        for name in LABELS.values():
            line = kernel_axes.plot(contexts, [results["kernel_us_per_layer"][c][name][f"{rows} rows"]
                                               for c in contexts], marker="o", label=f"{name}, {rows} rows")
            kernel_axes.plot(contexts, [results["kernel_us_per_layer"][c][name][f"{rows} rows, floor"]
                                        for c in contexts], "--", color=line[0].get_color(), label=f"{name}, floor")
        kernel_axes.set_xscale("log", base=2)
        kernel_axes.set_yscale("log")
        kernel_axes.set_xlabel("keys per row")
        kernel_axes.set_ylabel("us per layer")
        kernel_axes.set_title(f"decode attention, tiled caches, {results['threads']} threads")
        kernel_axes.legend(fontsize=8)
        cases = list(results["engine_decode_step_ms"])
        for i, name in enumerate(LABELS.values()):
            agreement = results["quality"].get(name, {}).get("top1_agreement")
            label = name if agreement is None else f"{name} (top-1 agreement {agreement:.3f})"
            engine_axes.bar([c + 0.3 * (i - 0.5) for c in range(len(cases))],
                            [results["engine_decode_step_ms"][case][name] for case in cases], 0.3, label=label)
        engine_axes.set_xticks(range(len(cases)), cases)
        engine_axes.set_ylabel("ms per eager decode step (median)")
        engine_axes.set_title("engine decode steps (base model), alternating rounds")
        engine_axes.legend(fontsize=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--bandwidth", type=float, default=47.7, help="GB/s for the floor (roofline.py)")
    parser.add_argument("--engine-rounds", type=int, default=5)
    parser.add_argument("--engine-steps", type=int, default=16, help="decode steps timed per round")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--forced", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/kv_cache_formats")
    args = parser.parse_args()
    if not paged_attention_cpu.available() or not paged_attention_cpu.tiled_cache_is_supported(torch.bfloat16,
                                                                                                HEAD_DIM, 16):
        raise SystemExit("tiled KV caches need the CPU kernels' AVX512-BF16 paths")

    results = {"model": args.model, "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
               "settings": vars(args)}
    with torch.inference_mode():
        results["kernel_us_per_layer"] = kernel_rounds(args)
        tokenizer = load_tokenizer(args.model)
        text = tokenizer(data_file("wikitext2_test_raw.txt").read_text()[:400_000], add_special_tokens=False).input_ids
        engines = {kv_cache_dtype: engine(args, kv_cache_dtype, tokenizer) for kv_cache_dtype in FORMATS}
        assert all(running.runner.tiled_cache for running in engines.values())
        results["engine_decode_step_ms"] = engine_rounds(args, engines, text)
        results["quality"] = quality(args, engines, text)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"), args.rows)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
