"""The CPU paged decode-attention kernel reads each row's keys through its block table, exactly as attention over
the gathered keys would, in every dtype and head shape; the engine decodes through it by default on a CPU, and
falls back to PyTorch's attention where it cannot be built."""

from __future__ import annotations

import pytest
import torch

from swiftkv.engine import paged_attention_cpu

from test_engine import GREEDY, engine_for, hf_greedy, prompts, run, swiftkv_model
from test_paged_attention import attention_over_gathered_keys

pytestmark = pytest.mark.skipif(not paged_attention_cpu.available(), reason="the C++ kernel could not be built")


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
    k_cache, v_cache = (torch.randn(kv_heads, num_blocks * block_size, head_dim, generator=generator).to(dtype)
                        for _ in "kv")
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
