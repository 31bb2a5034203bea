"""Prompt (prefill) attention on CPU: PyTorch's fused SDPA against the engine's C++ flash-attention kernel.

For one prompt chunk of `--lengths` queries over a cache laid out as the engine's (`[kv_heads, slots,
head_dim]` per layer, 16-slot blocks), bf16, in the two ways the engine can run it:
  SDPA      `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)` on a view of the contiguous
            slots (the engine's path without the kernel); a chunk that continues a prompt needs a mask;
  kernel    `swiftkv.engine.paged_attention_cpu.prefill_attention`, through a block table (shuffled blocks);
  floor     the causal attention's FLOPs at the bf16 matmul rate `benchmarks/roofline.py` measured.
Shapes: SmolLM2-135M's heads (9 query heads over 3 KV heads of 64) and Llama-3.1-8B's (32 over 8 of 128).
Also a continuation chunk (the last 512 queries of a 4096-key prompt), the case of chunked prefill.
Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from swiftkv.engine import paged_attention_cpu
from swiftkv.plotting import png_figure

from roofline import timed

SHAPES = {"smollm2-135m": (9, 3, 64), "llama-3.1-8b": (32, 8, 128)}
BLOCK = 16


def attention_flops(queries: int, keys: int, heads: int, head_dim: int) -> float:
    """QK^T and PV over the (query, key) pairs a causal chunk at the end of `keys` keys sees."""
    pairs = queries * (keys - queries) + queries * (queries + 1) / 2
    return 4 * pairs * heads * head_dim


def time_case(heads: int, kv_heads: int, head_dim: int, queries: int, keys: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(kv_heads, keys, head_dim, generator=generator).bfloat16() for _ in "kv")
    # the query heads as the engine's packed q|k|v projection leaves them: a strided view
    query = torch.randn(queries, heads + 2 * kv_heads, head_dim, generator=generator).bfloat16()[:, :heads]
    scale = head_dim ** -0.5
    mask = None
    if queries < keys:
        mask = torch.arange(keys)[None, :] <= torch.arange(keys - queries, keys)[:, None]

    def sdpa():
        return F.scaled_dot_product_attention(query.transpose(0, 1)[None], k_cache[None], v_cache[None],
                                              attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)

    # the same keys behind a shuffled block table, as a long-running server's cache holds them
    order = torch.randperm(keys // BLOCK, generator=generator)
    paged_k, paged_v = (torch.empty_like(k_cache) for _ in "kv")
    for new, old in enumerate(order.tolist()):
        paged_k[:, new * BLOCK:(new + 1) * BLOCK] = k_cache[:, old * BLOCK:(old + 1) * BLOCK]
        paged_v[:, new * BLOCK:(new + 1) * BLOCK] = v_cache[:, old * BLOCK:(old + 1) * BLOCK]
    table = torch.argsort(order).int()  # logical block -> physical block

    def kernel():
        return paged_attention_cpu.prefill_attention(query, paged_k, paged_v, table, keys, BLOCK, scale)

    error = (kernel().float() - sdpa()[0].transpose(0, 1).reshape(queries, -1).float()).abs().max().item()
    return {"queries": queries, "keys": keys, "sdpa_ms": 1000 * timed(sdpa, repeats),
            "kernel_ms": 1000 * timed(kernel, repeats), "flops": attention_flops(queries, keys, heads, head_dim),
            "max_abs_difference": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/prompt_attention")
    args = parser.parse_args()
    if not paged_attention_cpu.available() or not paged_attention_cpu.prefill_attention_is_fast(torch.bfloat16, 64):
        raise SystemExit("the engine's CPU prompt kernel is not built with its AVX512-BF16 path on this machine")
    matmul_gflops = json.loads(Path("benchmarks/results/roofline.json").read_text())["matmul_gflops"]
    result = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "settings": vars(args),
              "matmul_gflops": matmul_gflops, "cases": []}
    for shape in args.shapes:
        heads, kv_heads, head_dim = SHAPES[shape]
        cases = [(n, n) for n in args.lengths] + [(512, 4096)]
        for queries, keys in cases:
            row = {"shape": shape, **time_case(heads, kv_heads, head_dim, queries, keys, args.repeats)}
            row["floor_ms"] = row["flops"] / matmul_gflops / 1e6
            row["speedup"] = row["sdpa_ms"] / row["kernel_ms"]
            row["kernel_gflops"] = row["flops"] / row["kernel_ms"] / 1e6
            result["cases"].append(row)
            print(f"{shape:>13} {queries:>5} queries / {keys:>5} keys: SDPA {row['sdpa_ms']:7.1f} ms, kernel "
                  f"{row['kernel_ms']:6.1f} ms ({row['speedup']:.2f}x, {row['kernel_gflops']:.0f} GFLOP/s), "
                  f"floor {row['floor_ms']:5.1f} ms, max |diff| {row['max_abs_difference']:.3g}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    with png_figure(out.with_suffix(".png"), figsize=(10, 4.5), ncols=len(args.shapes)) as (fig, axes):
        for axis, shape in zip(axes if len(args.shapes) > 1 else [axes], args.shapes):
            rows = [row for row in result["cases"] if row["shape"] == shape]
            labels = [f"{row['queries']}/{row['keys']}" for row in rows]
            positions = range(len(rows))
            for offset, key, name in ((-0.27, "sdpa_ms", "PyTorch SDPA"), (0, "kernel_ms", "engine kernel"),
                                      (0.27, "floor_ms", "FLOPs at matmul rate")):
                axis.bar([p + offset for p in positions], [row[key] for row in rows], width=0.27, label=name)
            axis.set_xticks(list(positions), labels)
            axis.set_yscale("log")
            axis.set_xlabel("queries / keys (causal, one layer)")
            axis.set_ylabel("ms per layer")
            axis.set_title(f"{shape} heads, bf16, {result['threads']} threads", fontsize=9)
            axis.legend(fontsize=8)


if __name__ == "__main__":
    main()
