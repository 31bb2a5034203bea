"""Decode on a CPU through torch.compile: the whole step (every layer) as one inductor graph.

Eager, a decode step of a small model is a few hundred small ATen calls around the weight GEMVs; inductor
fuses the norms, RoPE, residuals and the MLP's activation into a handful of C++ kernels
(`benchmarks/decode_profile.py --compile`: SmolLM2-135M 11.0 ms against 13.5 ms per step eager, tokens equal).

Two things make the step compile into one graph that is reused for every length:
  * the KV-cache write is one opaque in-place custom op (`swiftkv::write_kv_cache`; a tiled cache's own writer,
    `swiftkv_cpu::write_tiled_kv_cache`, is one already): as ATen ops on a view of the cache (a graph input),
    inductor functionalises the mutation and copies the whole cache every step (250 ms per step);
  * the sizes that change from step to step are symbolic (`dynamic=True`) and never 0 or 1, the values torch
    specialises on: the row's block table (at least two blocks wide) for the CPU paged-attention kernel
    (engine/paged_attention_cpu.py, an opaque custom op here too); without that kernel, the row's first slot
    and its length (sequences' blocks start at 1, block 0 being scratch, and a decoding row has at least two
    keys).
Lone rows (one stream) take this path, and with the CPU paged kernel so do decode-only steps of several
rows: a second graph, compiled at start-up on a dummy step of two rows, whose row count is symbolic (>= 2),
so one graph serves every batch size without padding. Steps with prompt chunks run eagerly (their structure
changes from step to step, and each new structure would compile again). Since every step this path takes has
the structure of a start-up step, the runner skips re-checking the graphs' guards on each call beyond those
that tell the two graphs apart (`skip_guard_eval_unsafe`: about 0.7 ms of a 12 ms step);
tests/test_engine.py checks with guards on that no step would have compiled again, and that the tokens equal
eager decode and transformers.
"""

from __future__ import annotations

import time

import torch


# The graph's calls (the weight products, the attention and cache-write ops, inductor's fused kernels) made from
# generated C++ rather than Python: 0.5-1 ms less per one-stream SmolLM2 step (9.15 -> 8.18 ms in bf16, 5.77 ->
# 5.13 ms with int4 weights; benchmarks/README.md, "Compiled decode from a C++ wrapper").
CPP_WRAPPER = True


@torch.library.custom_op("swiftkv::write_kv_cache", mutates_args=("cache",))
def write_kv_cache(cache: torch.Tensor, first: int, last: int, slots: torch.Tensor, states: torch.Tensor) -> None:
    """`states` `[entries, kv_heads, tokens, d]` into cache entries `[first, last)` at `slots`. The C++ twin,
    `torch.ops.swiftkv_cpu.write_kv_cache` (engine/paged_attention_cpu.py), skips the Python dispatcher on
    every call and is used where it is built."""
    cache[first:last].index_copy_(2, slots, states)


def kv_cache_writer(runner):
    """The compiled step's KV-cache write op: the C++ one where the runner decodes through the CPU kernel (the
    same library registers both)."""
    return torch.ops.swiftkv_cpu.write_kv_cache if runner.paged_kernel is not None else torch.ops.swiftkv.write_kv_cache


def dummy_decode_batch(runner, rows: int):
    """A decode-only step of `rows` rows that each read two keys of block 1 (tables are at least two blocks
    wide) and write to the scratch block, built as `ModelRunner._batch` builds a real one."""
    from swiftkv.engine.model_runner import Batch, QueryRows

    device, block_size = runner.device, runner.block_size
    if runner.paged_kernel is not None:
        query_rows = QueryRows([2] * rows, block_tables=torch.full((rows, 2), runner.first_block, dtype=torch.int32),
                               key_counts=torch.full((rows,), 2, dtype=torch.int32))
    else:
        query_rows = QueryRows([2] * rows, in_place_starts=[runner.first_block * block_size] * rows)
    return Batch(input_ids=torch.zeros(rows, dtype=torch.long, device=device),
                 positions=torch.ones(rows, dtype=torch.long, device=device),
                 write_slots=torch.arange(rows, device=device) + runner.scratch_block * block_size,
                 rows=query_rows, upper_rows=query_rows if runner.swiftkv else None)


def compile_decode(runner):
    """`runner._forward` compiled for decode-only steps: lone rows (block tables or in place) and, with a paged
    kernel, batches of rows; compiled now on dummy steps (returns the compiled function;
    `runner.compile_seconds` says how long compiling took)."""
    from swiftkv.engine.model_runner import onednn

    if runner.quantized:
        raise ValueError("compile_decode needs kv_cache_dtype='auto' (compiled steps are built for unquantized "
                         "caches)")
    runner.compiled_kv_write = kv_cache_writer(runner)
    compiled = torch.compile(runner._forward, dynamic=True, options={"cpp_wrapper": CPP_WRAPPER})
    # built outside inference mode, as the runner builds a step's batch
    lone, pair = dummy_decode_batch(runner, 1), dummy_decode_batch(runner, 2)
    started = time.perf_counter()
    # no duck sizing: the dummy's sizes that equal by chance (its table's width and a model's KV heads, say)
    # must not become one symbol, or a later step whose sizes differ would need a new graph
    with torch.inference_mode(), torch.fx.experimental._config.patch(use_duck_shape=False):
        with onednn(enabled=False):
            compiled(lone)  # as `ModelRunner.forward` runs a single token
        if runner.paged_kernel is not None:
            with onednn(enabled=True):
                compiled(pair)  # rows symbolic from here on: every batch size >= 2
    runner.compile_seconds = time.perf_counter() - started
    return compiled
