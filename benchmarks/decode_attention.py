"""Decode attention on CPU: reading K/V in place from the paged cache against gathering them first.

For one query token per row over contexts of `--contexts` keys (SmolLM2-135M's heads: 9 query heads over 3
KV heads of 64, bf16), in a cache laid out as the engine's (`[kv_heads, slots, head_dim]` per layer):
  gather + matmuls   `index_select` of the row's slots, then two small matmuls (oneDNN), the batch path;
  in place, SDPA     PyTorch's fused SDPA kernel on a view of the row's contiguous slots, no copy;
  batch of rows      `--rows` rows of the same length: gather + matmuls, SDPA with a padding mask, or each
                     row in place one after the other (the engine's choice above GATHERED_ROWS_MAX_MEAN_KEYS);
  keys split         one row in place with its keys split in two halves the kernel runs in parallel, merged
                     by their log-sum-exp (flash-decoding), to use both cores;
  paged kernel       the engine's C++ kernel (engine/paged_attention_cpu.py): one row, and the batch of rows in
                     one call, each following a block table of 16-slot blocks; also one row with its keys
                     already in cache (the same layer every call), on two threads and on one;
  tiled cache        the same kernel over the engine's tiled bf16 cache (csrc/bf16_tiles.h: K and V stored as
                     the pairs `vdpbf16ps` reads, so no transposes or unpacks per key);
  floor              the row's K and V bytes at `--bandwidth` GB/s (benchmarks/roofline.py measures it).
Each cache read covers a different layer's slots per call, so timings include reading K/V from memory, as a
decode step does. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from swiftkv.engine import paged_attention_cpu
from swiftkv.engine.model_runner import onednn
from swiftkv.plotting import png_figure

KV_HEADS, GROUP, HEAD_DIM, LAYERS = 3, 3, 64, 30


def timed(call, repeats: int) -> float:
    for layer in range(4):
        call(layer)
    started = time.perf_counter()
    for index in range(repeats):
        call(index % LAYERS)
    return 1e6 * (time.perf_counter() - started) / repeats


def one_thread(measure):
    """`measure()` with torch on one thread: how much of the kernel's time is instructions, not bytes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure()
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--bandwidth", type=float, default=47.7, help="GB/s for the floor (roofline.py)")
    parser.add_argument("--out", default="benchmarks/results/decode_attention")
    args = parser.parse_args()
    if not paged_attention_cpu.available():
        raise SystemExit("the CPU paged-attention kernel could not be built (see the warning above)")

    longest = max(args.contexts)
    slots_per_layer = args.rows * longest
    cache = torch.randn(LAYERS, KV_HEADS, slots_per_layer, HEAD_DIM, dtype=torch.bfloat16)
    values = torch.randn_like(cache)
    tiled_keys = paged_attention_cpu.tile_cache(cache, values=False)
    tiled_values = paged_attention_cpu.tile_cache(values, values=True)
    scale = HEAD_DIM ** -0.5
    results = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "settings": vars(args),
               "microseconds_per_layer": {}}
    with torch.inference_mode(), onednn(True):
        for context in args.contexts:
            query = torch.randn(KV_HEADS, 1, GROUP, HEAD_DIM, dtype=torch.bfloat16)
            slots = torch.arange(context)
            row_slots = torch.stack([torch.arange(r * longest, r * longest + context) for r in range(args.rows)])
            queries = torch.randn(KV_HEADS, args.rows, GROUP, HEAD_DIM, dtype=torch.bfloat16)
            mask = torch.ones(args.rows, 1, 1, context, dtype=torch.bool)

            def gather_matmuls(layer, slots=slots, query=query):
                keys = cache[layer].index_select(1, slots.reshape(-1)).view(KV_HEADS, -1, slots.shape[-1], HEAD_DIM)
                vals = values[layer].index_select(1, slots.reshape(-1)).view_as(keys)
                probabilities = torch.softmax((query @ keys.transpose(-1, -2)).float() * scale, -1).to(keys.dtype)
                return probabilities @ vals

            def in_place(layer):
                keys = cache[layer, :, :context].unsqueeze(1)
                return F.scaled_dot_product_attention(query, keys, values[layer, :, :context].unsqueeze(1),
                                                      scale=scale)

            def batch_sdpa(layer):
                keys = cache[layer].index_select(1, row_slots.reshape(-1)).view(KV_HEADS, args.rows, context, HEAD_DIM)
                vals = values[layer].index_select(1, row_slots.reshape(-1)).view_as(keys)
                return F.scaled_dot_product_attention(queries.transpose(0, 1), keys.transpose(0, 1),
                                                      vals.transpose(0, 1), attn_mask=mask, scale=scale)

            def rows_in_place(layer):
                return [F.scaled_dot_product_attention(queries[:, r, None], cache[layer, :, None, s:s + context],
                                                       values[layer, :, None, s:s + context], scale=scale)
                        for r, s in enumerate(range(0, args.rows * longest, longest))]

            def split_keys(layer):
                keys = cache[layer, :, :context].reshape(KV_HEADS, 2, context // 2, HEAD_DIM)
                vals = values[layer, :, :context].reshape(KV_HEADS, 2, context // 2, HEAD_DIM)
                output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    query.expand(KV_HEADS, 2, GROUP, HEAD_DIM), keys, vals, scale=scale)
                return (output * torch.softmax(logsumexp, dim=1).unsqueeze(-1).to(output.dtype)).sum(1, keepdim=True)

            block = 16
            tables = (row_slots[:, ::block] // block).int()  # every row's blocks, in order
            counts = torch.full((args.rows,), context, dtype=torch.int32)

            def paged(layer, rows=args.rows, tiled=False):
                query_rows = queries.transpose(0, 1)[:rows].reshape(rows, KV_HEADS * GROUP, HEAD_DIM)
                keys, vals = (tiled_keys, tiled_values) if tiled else (cache, values)
                return paged_attention_cpu.paged_decode_attention(query_rows, keys[layer], vals[layer], tables[:rows],
                                                                  counts[:rows], block, scale, tiled=tiled)

            floor_us = 1e6 * 2 * cache[0, :, :context].nbytes / (args.bandwidth * 1e9)  # one row's K and V
            torch.testing.assert_close(in_place(0), gather_matmuls(0), atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(split_keys(0), in_place(0), atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(paged(0, 1).view(KV_HEADS, 1, GROUP, HEAD_DIM),
                                       rows_in_place(0)[0], atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(paged(0, tiled=True), paged(0), atol=2e-2, rtol=2e-2)
            row = {"one row, gather + matmuls": timed(gather_matmuls, args.repeats),
                   "one row, in place (SDPA)": timed(in_place, args.repeats),
                   f"{args.rows} rows, gather + matmuls": timed(
                       lambda layer: gather_matmuls(layer, row_slots, queries), args.repeats),
                   f"{args.rows} rows, gather + SDPA with mask": timed(batch_sdpa, args.repeats),
                   f"{args.rows} rows, each in place (SDPA)": timed(rows_in_place, args.repeats),
                   "one row, in place, keys split in 2": timed(split_keys, args.repeats),
                   "one row, paged kernel": timed(lambda layer: paged(layer, 1), args.repeats),
                   "one row, paged kernel, keys in cache": timed(lambda layer: paged(0, 1), args.repeats),
                   "one row, paged kernel, keys in cache, 1 thread": one_thread(
                       lambda: timed(lambda layer: paged(0, 1), args.repeats)),
                   f"{args.rows} rows, paged kernel": timed(paged, args.repeats),
                   "one row, paged kernel, tiled cache": timed(lambda layer: paged(layer, 1, True), args.repeats),
                   "one row, paged kernel, tiled cache, keys in cache": timed(lambda layer: paged(0, 1, True),
                                                                              args.repeats),
                   "one row, paged kernel, tiled cache, keys in cache, 1 thread": one_thread(
                       lambda: timed(lambda layer: paged(0, 1, True), args.repeats)),
                   f"{args.rows} rows, paged kernel, tiled cache": timed(lambda layer: paged(layer, tiled=True),
                                                                         args.repeats),
                   "one row, floor": floor_us,
                   f"{args.rows} rows, floor": args.rows * floor_us}
            results["microseconds_per_layer"][context] = row
            print(context, {name: round(value, 1) for name, value in row.items()}, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    """Every timing against the context; the tiled cache's dashed, the floors dotted."""
    from matplotlib import colormaps

    with png_figure(path, figsize=(11, 5)) as (fig, axis):
        timings = results["microseconds_per_layer"]
        contexts = list(timings)
        colors = colormaps["tab20"].colors
        for index, name in enumerate(timings[contexts[0]]):
            style = ":" if "floor" in name else "--" if "tiled" in name else "-"
            axis.plot([int(c) for c in contexts], [timings[c][name] for c in contexts], label=name,
                      color=colors[index % len(colors)], marker="" if "floor" in name else "o", linestyle=style)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("context (keys)")
        axis.set_ylabel("microseconds per layer")
        axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.suptitle("Decode attention on CPU: 9 query heads over 3 KV heads of 64, bf16, "
                     f"{results['threads']} threads")

if __name__ == "__main__":
    main()
