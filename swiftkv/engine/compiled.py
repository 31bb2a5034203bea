"""One-stream decode on a CPU through torch.compile: the whole step (every layer) as one inductor graph.

Eager, a decode step of a small model is a few hundred small ATen calls around the weight GEMVs; inductor
fuses the norms, RoPE, residuals and the MLP's activation into a handful of C++ kernels
(`benchmarks/decode_profile.py --compile`: SmolLM2-135M 11.0 ms against 13.5 ms per step eager, tokens equal).

Two things make the step compile into one graph that is reused for every length:
  * the KV-cache write is one opaque in-place custom op (`swiftkv::write_kv_cache`): as ATen ops on a view of
    the cache (a graph input), inductor functionalises the mutation and copies the whole cache every step
    (250 ms per step);
  * the only integers in the step, the row's first slot and its length, are symbolic (`dynamic=True`) and
    never 0 or 1, the values torch specialises on: sequences' blocks start at 1 (block 0 is scratch) and a
    decoding row has at least two keys.
Only lone in-place rows (one stream) take this path; batches and prompt chunks run eagerly (their structure
changes from step to step, and each new structure would compile again). Since every step this path takes has
the structure of the start-up step, the runner skips re-checking the graph's guards on each call
(`skip_guard_eval_unsafe`: about 0.7 ms of a 12 ms step); tests/test_engine.py checks with guards on that no
step would have compiled again, and that the tokens equal eager decode and transformers.
"""

from __future__ import annotations

import time

import torch


@torch.library.custom_op("swiftkv::write_kv_cache", mutates_args=("cache",))
def write_kv_cache(cache: torch.Tensor, first: int, last: int, slots: torch.Tensor, states: torch.Tensor) -> None:
    """`states` `[entries, kv_heads, tokens, d]` into cache entries `[first, last)` at `slots`."""
    cache[first:last].index_copy_(2, slots, states)


def compile_lone_row_decode(runner):
    """`runner._forward` compiled for single-row in-place decode batches, compiled now on a dummy step that
    writes to the scratch block (returns the compiled function; `runner.compile_seconds` says how long
    compiling took)."""
    from swiftkv.engine.model_runner import Batch, QueryRows, onednn

    if runner.quantized:
        raise ValueError("compile_decode needs kv_cache_dtype='auto' (8-bit caches are gathered, not read in place)")
    compiled = torch.compile(runner._forward, dynamic=True)
    device, block_size = runner.device, runner.block_size
    rows = QueryRows([2], in_place_starts=[runner.first_block * block_size])  # two keys of block 1: only read
    batch = Batch(input_ids=torch.zeros(1, dtype=torch.long, device=device),
                  positions=torch.ones(1, dtype=torch.long, device=device),
                  write_slots=torch.full((1,), runner.scratch_block * block_size, device=device),
                  rows=rows, upper_rows=rows if runner.swiftkv else None)
    started = time.perf_counter()
    with torch.inference_mode(), onednn(enabled=False):  # as `ModelRunner.forward` runs a single token
        compiled(batch)
    runner.compile_seconds = time.perf_counter() - started
    return compiled
