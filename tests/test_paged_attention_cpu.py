"""The CPU paged attention kernels read keys through block tables exactly as attention over the gathered keys
would, in every dtype and head shape: the decode kernel (one query per row) and the prompt kernel (a causal chunk
of queries). The engine runs through both by default on a CPU, and falls back to PyTorch's attention where they
cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swiftkv.engine import paged_attention_cpu

from conftest import make_base_model
from swiftkv.convert import convert_to_swiftkv
from swiftkv.engine.sequence import Chunk

from test_engine import GREEDY, engine_for, hf_greedy, prompts, reserved_sequences, run, swiftkv_model
from test_paged_attention import attention_over_gathered_keys

pytestmark = pytest.mark.skipif(not paged_attention_cpu.available(), reason="the C++ kernel could not be built")


def random_caches(kv_heads, slots, head_dim, dtype, generator):
    """One cache entry's K and V, `[kv_heads, slots, head_dim]` each."""
    return (torch.randn(kv_heads, slots, head_dim, generator=generator).to(dtype) for _ in "kv")


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [
    (4, 2, 16, 4),     # the test models' shape, small blocks
    (9, 3, 64, 16),    # SmolLM2's GQA (3 query heads per KV head)
    (32, 8, 128, 16),  # Llama-3.1-8B's (more query heads per KV head than the kernel holds in registers at once)
    (4, 2, 24, 4),     # a head size that is not a multiple of 16: the plain loops
    (6, 6, 32, 8),     # no GQA
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_attention_over_gathered_keys(heads, kv_heads, head_dim, block_size, dtype):
    generator = torch.Generator().manual_seed(0)
    num_blocks = 300
    k_cache, v_cache = random_caches(kv_heads, num_blocks * block_size, head_dim, dtype, generator)
    # one key, a partial block, whole blocks, and a row long enough that its keys are split over several tasks
    # (the short rows' shares are then empty)
    key_counts = torch.tensor([1, 37, 5 * block_size, 1100], dtype=torch.int32)
    width = -(-1100 // block_size)
    block_tables = torch.stack([torch.randperm(num_blocks, generator=generator)[:width] for _ in key_counts]).int()
    # a strided view, as in the runner
    query = torch.randn(4, heads + kv_heads, head_dim, generator=generator).to(dtype)[:, :heads]
    scale = head_dim ** -0.5
    output = paged_attention_cpu.paged_decode_attention(query, k_cache, v_cache, block_tables, key_counts,
                                                        block_size, scale)
    expected = attention_over_gathered_keys(query.float(), k_cache.float(), v_cache.float(), block_tables,
                                            key_counts, block_size, scale)
    assert output.dtype == dtype and output.shape == (4, heads * head_dim)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(output.float(), expected, atol=tolerance, rtol=tolerance)


def test_bad_arguments_get_a_clear_error():
    cache = torch.zeros(2, 16, 16)
    with pytest.raises(RuntimeError, match="int32"):
        paged_attention_cpu.paged_decode_attention(torch.zeros(1, 4, 16), cache, cache, torch.zeros(1, 1).long(),
                                                   torch.ones(1, dtype=torch.int32), 4, 0.25)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        paged_attention_cpu.paged_decode_attention(torch.zeros(1, 3, 16), cache, cache, torch.zeros(1, 1).int(),
                                                   torch.ones(1, dtype=torch.int32), 4, 0.25)


@pytest.mark.parametrize("group_size", [1, 2])
def test_the_engine_decodes_through_the_kernel_and_equals_transformers(group_size):
    model = swiftkv_model("llama", group_size)
    engine = engine_for(model)
    assert engine.runner.paged_kernel is paged_attention_cpu.paged_decode_attention
    for prompt, output in zip(prompts(3), run(engine, prompts(3), GREEDY)):  # a batch, then rows finishing
        assert output.token_ids == hf_greedy(model, prompt, 10)


def test_without_the_kernel_the_engine_uses_pytorch_attention_and_gets_the_same_tokens(monkeypatch):
    model = swiftkv_model()
    expected = [output.token_ids for output in run(engine_for(model), prompts(3), GREEDY)]
    monkeypatch.setenv(paged_attention_cpu.DISABLE_VARIABLE, "0")
    engine = engine_for(model)
    assert engine.runner.paged_kernel is None
    assert [output.token_ids for output in run(engine, prompts(3), GREEDY)] == expected


def causal_attention_over_gathered_keys(query, k_cache, v_cache, block_table, keys, block_size, scale):
    """float32 reference: the queries sit at positions `[keys - n, keys)` and see the keys up to their own."""
    slots = (block_table[:, None].long() * block_size + torch.arange(block_size)).reshape(-1)[:keys]
    queries = query.shape[0]
    visible = torch.arange(keys)[None, :] <= torch.arange(keys - queries, keys)[:, None]
    output = F.scaled_dot_product_attention(query.float().transpose(0, 1)[None], k_cache[None, :, slots].float(),
                                            v_cache[None, :, slots].float(), attn_mask=visible, scale=scale,
                                            enable_gqa=True)
    return output[0].transpose(0, 1).reshape(queries, -1)


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [
    (9, 3, 64, 16),    # SmolLM2's GQA: the vectorised path's 48-row tiles
    (32, 8, 128, 16),  # Llama-3.1-8B's
    (4, 2, 96, 4),     # a head size that is a multiple of 32 but not 64
    (6, 6, 32, 8),     # no GQA
    (4, 2, 24, 4),     # not a multiple of 32: the plain loop
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_prompt_kernel_equals_causal_attention_over_gathered_keys(heads, kv_heads, head_dim, block_size, dtype):
    generator = torch.Generator().manual_seed(0)
    num_blocks = 300
    k_cache, v_cache = random_caches(kv_heads, num_blocks * block_size, head_dim, dtype, generator)
    # a one-token prompt, whole prompts shorter and longer than a key block, and chunks that continue a prompt
    # (a long one; one query; one whose keys end mid key block)
    for keys, queries in [(1, 1), (37, 37), (300, 300), (1000, 45), (1000, 1), (130, 64)]:
        table = torch.randperm(num_blocks, generator=generator)[:-(-keys // block_size)].int()
        query = torch.randn(queries, heads + kv_heads, head_dim, generator=generator).to(dtype)[:, :heads]
        scale = head_dim ** -0.5
        output = paged_attention_cpu.prefill_attention(query, k_cache, v_cache, table, keys, block_size, scale)
        expected = causal_attention_over_gathered_keys(query, k_cache, v_cache, table, keys, block_size, scale)
        assert output.dtype == dtype and output.shape == (queries, heads * head_dim)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(output.float(), expected, atol=tolerance, rtol=tolerance)


def test_prompt_kernel_bad_arguments_get_a_clear_error():
    cache, query = torch.zeros(2, 16, 32), torch.zeros(4, 4, 32)
    with pytest.raises(RuntimeError, match="fewer than"):
        paged_attention_cpu.prefill_attention(query, cache, cache, torch.zeros(1, dtype=torch.int32), 8, 4, 0.2)
    with pytest.raises(RuntimeError, match="outside the cache"):
        paged_attention_cpu.prefill_attention(query, cache, cache, torch.tensor([0, 9], dtype=torch.int32), 8, 4, 0.2)
    with pytest.raises(RuntimeError, match="queries <= keys"):
        paged_attention_cpu.prefill_attention(query, cache, cache, torch.tensor([0], dtype=torch.int32), 2, 4, 0.2)


@pytest.mark.skipif(not paged_attention_cpu.prefill_attention_is_fast(torch.bfloat16, 32),
                    reason="the prompt kernel's vectorised path needs AVX512-BF16")
@pytest.mark.parametrize("swiftkv", [False, True])
def test_the_engine_prefills_through_the_prompt_kernel_with_the_logits_of_sdpa(monkeypatch, swiftkv):
    """bf16 with 32-wide heads, where the engine takes the kernel: a whole prompt, and a prompt in two chunks
    (the second continuing the first's keys), packed in one step, give SDPA's logits up to bf16 rounding."""
    model = make_base_model("llama", hidden_size=128).bfloat16()
    if swiftkv:
        model = convert_to_swiftkv(model, 2, 1)

    def logits():
        engine = engine_for(model, dtype="bfloat16")
        calls = []
        if engine.runner.prompt_kernel is not None:
            kernel = engine.runner.prompt_kernel
            engine.runner.prompt_kernel = lambda *args: calls.append((len(args[0]), args[4])) or kernel(*args)
        whole, chunked = reserved_sequences(engine, prompts(2, seed=5))
        engine.runner.run([Chunk(chunked, 0, 9)])
        return engine.runner.run([Chunk(whole, 0, len(whole)), Chunk(chunked, 9, len(chunked))]), calls

    with_kernel, calls = logits()
    assert (len(prompts(2, seed=5)[1]) - 9, len(prompts(2, seed=5)[1])) in calls  # the continuing chunk
    monkeypatch.setenv(paged_attention_cpu.DISABLE_VARIABLE, "0")
    without_kernel, no_calls = logits()
    assert not no_calls
    for kernel_logits, sdpa_logits in zip(with_kernel, without_kernel):
        torch.testing.assert_close(kernel_logits.float(), sdpa_logits.float(), atol=1e-2, rtol=1e-2)


tiled_path = pytest.mark.skipif(not paged_attention_cpu.tiled_cache_is_supported(torch.bfloat16, 32, 16),
                                reason="a tiled cache needs the kernels' AVX512-BF16 paths")


@tiled_path
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [
    (9, 3, 64, 16),    # SmolLM2
    (32, 8, 128, 16),  # Llama-3.1-8B: more query heads per KV head than the kernels hold in registers at once
    (4, 2, 96, 32),    # a head size that is a multiple of 32 but not 64, blocks of two tiles
    (6, 6, 32, 16),    # no GQA
])
def test_both_kernels_read_a_tiled_cache_as_attention_over_its_slots(heads, kv_heads, head_dim, block_size):
    generator = torch.Generator().manual_seed(1)
    num_blocks, scale = 200, head_dim ** -0.5
    k_cache, v_cache = random_caches(kv_heads, num_blocks * block_size, head_dim, torch.bfloat16, generator)
    k_tiled = paged_attention_cpu.tile_cache(k_cache, values=False)
    v_tiled = paged_attention_cpu.tile_cache(v_cache, values=True)
    # decode rows: one key, part of a tile, exactly a key block, one key more, and a row split over several tasks
    key_counts = torch.tensor([1, 37, 64, 65, 5 * block_size, 1100], dtype=torch.int32)
    tables = torch.stack([torch.randperm(num_blocks, generator=generator)[:-(-1100 // block_size)]
                          for _ in key_counts]).int()
    query = torch.randn(len(key_counts), heads + kv_heads, head_dim, generator=generator).bfloat16()[:, :heads]
    output = paged_attention_cpu.paged_decode_attention(query, k_tiled, v_tiled, tables, key_counts, block_size,
                                                        scale, tiled=True)
    expected = attention_over_gathered_keys(query.float(), k_cache.float(), v_cache.float(), tables, key_counts,
                                            block_size, scale)
    torch.testing.assert_close(output.float(), expected, atol=1e-2, rtol=1e-2)
    for keys, queries in [(1, 1), (37, 37), (300, 300), (1000, 45), (130, 64)]:  # prompts and continuing chunks
        table = torch.randperm(num_blocks, generator=generator)[:-(-keys // block_size)].int()
        query = torch.randn(queries, heads + kv_heads, head_dim, generator=generator).bfloat16()[:, :heads]
        output = paged_attention_cpu.prefill_attention(query, k_tiled, v_tiled, table, keys, block_size, scale,
                                                       tiled=True)
        expected = causal_attention_over_gathered_keys(query, k_cache, v_cache, table, keys, block_size, scale)
        torch.testing.assert_close(output.float(), expected, atol=2e-2, rtol=2e-2)


@tiled_path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])  # bf16 K/V, or an int8 cache's codes
def test_a_tiled_write_puts_each_token_where_tiling_the_slot_ordered_cache_puts_it(dtype):
    generator = torch.Generator().manual_seed(2)
    slots = torch.randperm(40 * 16, generator=generator)[:50]
    states = (torch.randn(50, 2, 3, 64, generator=generator) * 40).clamp(-127, 127).to(dtype).permute(1, 2, 0, 3)
    for values in (False, True):
        tiled, slot_ordered = torch.zeros(3, 3, 40 * 16, 64, dtype=dtype), torch.zeros(3, 3, 40 * 16, 64, dtype=dtype)
        paged_attention_cpu.write_tiled_kv_cache(tiled, 1, 3, slots, states, values)
        slot_ordered[1:3].index_copy_(2, slots, states)
        assert torch.equal(tiled, paged_attention_cpu.tile_cache(slot_ordered, values))


@tiled_path
def test_a_tiled_int8_write_quantizes_bf16_states_as_the_runner_does():
    """The C++ write of an int8 cache computes the codes and scales of `ModelRunner._encoded` (bf16 arithmetic)."""
    generator = torch.Generator().manual_seed(6)
    runner = engine_for(make_base_model("llama", hidden_size=128).bfloat16(), dtype="bfloat16", block_size=16,
                        kv_cache_dtype="int8").runner
    slots = torch.randperm(runner.k_cache.shape[2], generator=generator)[:40] + 16  # past the scratch block
    slots = slots[slots < runner.k_cache.shape[2]]
    states = torch.randn(len(slots), 2, runner.num_kv_heads, runner.head_dim, generator=generator).bfloat16()
    states[0] = 0  # an all-zero token: the clamped scale
    runner._write(slice(1, 3), slots, states, 3 * states)
    for cache, scales, written in ((runner.k_cache, runner.k_scale, states), (runner.v_cache, runner.v_scale,
                                                                              3 * states)):
        codes, scale = runner._encoded(written.permute(1, 2, 0, 3))
        expected = torch.zeros_like(cache[1:3])
        expected.index_copy_(2, slots, codes)
        assert torch.equal(cache[1:3], paged_attention_cpu.tile_cache(expected, values=cache is runner.v_cache))
        assert torch.equal(scales[1:3].index_select(2, slots), scale)


def test_a_cache_that_cannot_be_tiled_gets_a_clear_error():
    cache = torch.zeros(2, 16, 16)  # float32, head size 16
    with pytest.raises(RuntimeError, match="tiled KV cache needs bf16"):
        paged_attention_cpu.paged_decode_attention(torch.zeros(1, 4, 16), cache, cache, torch.zeros(1, 1).int(),
                                                   torch.ones(1, dtype=torch.int32), 16, 0.25, tiled=True)


def prompt_and_decode_logits(engine) -> list[torch.Tensor]:
    """A whole prompt and a chunked one packed in one step, then three decode steps of both: every logits row."""
    whole, chunked = reserved_sequences(engine, prompts(2, seed=5))
    engine.runner.run([Chunk(chunked, 0, 9)])
    steps = [engine.runner.run([Chunk(whole, 0, len(whole)), Chunk(chunked, 9, len(chunked))])]
    for token in (7, 11, 13):
        for sequence in (whole, chunked):
            sequence.token_ids.append(token)
        steps.append(engine.runner.run([Chunk(s, len(s) - 1, len(s)) for s in (whole, chunked)]))
    return [row for step in steps for row in step]


@tiled_path
@pytest.mark.parametrize("swiftkv", [False, True])
def test_the_engine_tiles_bf16_caches_and_gets_the_logits_of_pytorch_attention(monkeypatch, swiftkv):
    """bf16, 32-wide heads, blocks of 16: the engine stores K/V tiled; a whole prompt and a chunked one packed in
    one step, then decode steps of both, give the logits of PyTorch's attention over slot-ordered caches."""
    model = make_base_model("llama", hidden_size=128).bfloat16()
    if swiftkv:
        model = convert_to_swiftkv(model, 2, 1)

    def logits():
        engine = engine_for(model, dtype="bfloat16", block_size=16)
        return prompt_and_decode_logits(engine), engine.runner.tiled_cache

    tiled_logits, tiled = logits()
    monkeypatch.setenv(paged_attention_cpu.DISABLE_VARIABLE, "0")
    pytorch_logits, pytorch_tiled = logits()
    assert tiled and not pytorch_tiled
    for ours, theirs in zip(tiled_logits, pytorch_logits):
        torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-2, rtol=2e-2)


def int8_codes(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of `[kv_heads, slots, d]` and their bf16 scales `[kv_heads, slots, 1]`, as the engine's int8 cache."""
    scale = (cache.float().abs().amax(-1, keepdim=True) / 127).bfloat16()
    return (cache.float() / scale.float()).round().clamp(-127, 127).to(torch.int8), scale


@tiled_path
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [(9, 3, 64, 16), (32, 8, 128, 16), (4, 2, 96, 32)])
def test_both_kernels_read_a_tiled_int8_cache_as_attention_over_its_dequantized_slots(heads, kv_heads, head_dim,
                                                                                      block_size):
    generator = torch.Generator().manual_seed(3)
    num_blocks, scale = 200, head_dim ** -0.5
    k_cache, v_cache = random_caches(kv_heads, num_blocks * block_size, head_dim, torch.bfloat16, generator)
    (k_codes, k_scale), (v_codes, v_scale) = int8_codes(k_cache), int8_codes(v_cache)
    key_counts = torch.tensor([1, 37, 64, 65, 5 * block_size, 1100], dtype=torch.int32)
    tables = torch.stack([torch.randperm(num_blocks, generator=generator)[:-(-1100 // block_size)]
                          for _ in key_counts]).int()
    query = torch.randn(len(key_counts), heads, head_dim, generator=generator).bfloat16()
    k_tiled = paged_attention_cpu.tile_cache(k_codes, values=False)
    v_tiled = paged_attention_cpu.tile_cache(v_codes, values=True)
    output = paged_attention_cpu.paged_decode_attention(query, k_tiled, v_tiled, tables, key_counts, block_size, scale,
                                                        tiled=True, k_scale=k_scale, v_scale=v_scale)
    k_values, v_values = k_codes * k_scale.float(), v_codes * v_scale.float()
    expected = attention_over_gathered_keys(query.float(), k_values, v_values, tables, key_counts, block_size, scale)
    torch.testing.assert_close(output.float(), expected, atol=1e-2, rtol=1e-2)
    for keys, queries in [(1, 1), (37, 37), (300, 300), (1000, 45)]:  # prompts and continuing chunks
        table = torch.randperm(num_blocks, generator=generator)[:-(-keys // block_size)].int()
        query = torch.randn(queries, heads, head_dim, generator=generator).bfloat16()
        output = paged_attention_cpu.prefill_attention(query, k_tiled, v_tiled, table, keys, block_size, scale,
                                                       tiled=True, k_scale=k_scale, v_scale=v_scale)
        expected = causal_attention_over_gathered_keys(query, k_values, v_values, table, keys, block_size, scale)
        torch.testing.assert_close(output.float(), expected, atol=2e-2, rtol=2e-2)


@tiled_path
@pytest.mark.parametrize("swiftkv", [False, True])
def test_the_engine_tiles_int8_caches_and_gets_the_logits_of_its_slot_ordered_int8_cache(swiftkv):
    """An int8 cache in tiles (decode rows and prompt chunks through the kernels) computes what the slot-ordered
    int8 cache computes through PyTorch (blocks of 8 slots cannot be tiled)."""
    model = make_base_model("llama", hidden_size=128).bfloat16()
    if swiftkv:
        model = convert_to_swiftkv(model, 2, 1)

    def logits(block_size):
        engine = engine_for(model, dtype="bfloat16", block_size=block_size, kv_cache_dtype="int8")
        return prompt_and_decode_logits(engine), engine.runner.tiled_cache

    (tiled_logits, tiled), (slot_logits, slot_ordered_tiled) = logits(16), logits(8)
    assert tiled and not slot_ordered_tiled
    for ours, theirs in zip(tiled_logits, slot_logits):
        torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-2, rtol=2e-2)
