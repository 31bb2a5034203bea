"""The paged decode-attention kernel reads each row's keys through its block table, exactly as attention over
the gathered keys would; on a CPU it runs in Triton's interpreter (the same kernel source as on a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swiftkv.engine import paged_attention
from swiftkv.engine.cuda_graphs import batch_buckets
from swiftkv.engine.model_runner import encode_kv

from test_engine import GREEDY, engine_for, hf_greedy, prompts, run, swiftkv_model

pytestmark = pytest.mark.skipif(not paged_attention.available(), reason="needs Triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the compiled kernel, else the interpreter (conftest)


def attention_over_gathered_keys(query, k_cache, v_cache, block_tables, key_counts, block_size, scale):
    rows = []
    for row in range(query.shape[0]):
        positions = torch.arange(int(key_counts[row]))
        slots = block_tables[row].long()[positions // block_size] * block_size + positions % block_size
        output = F.scaled_dot_product_attention(query[row][None, :, None], k_cache[None, :, slots],
                                                v_cache[None, :, slots], scale=scale, enable_gqa=True)
        rows.append(output[0, :, 0].reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size, splits", [
    (4, 2, 16, 4, 1),     # the test models' shape, small blocks
    (4, 2, 16, 4, 3),     # keys split three ways, some splits empty for the short rows
    (9, 3, 64, 16, None),  # SmolLM2's GQA (3 query heads per KV head: padded to the kernel's 16)
    (32, 8, 128, 16, 2),  # Llama-3.1-8B's
])
def test_kernel_equals_attention_over_gathered_keys(heads, kv_heads, head_dim, block_size, splits):
    generator = torch.Generator().manual_seed(0)
    num_blocks = 40
    k_cache, v_cache = (torch.randn(kv_heads, num_blocks * block_size, head_dim, generator=generator) for _ in "kv")
    key_counts = torch.tensor([1, 37, 5 * block_size], dtype=torch.int32)  # one key, a partial block, whole blocks
    block_tables = torch.stack([torch.randperm(num_blocks, generator=generator)[:12] for _ in key_counts]).int()
    query = torch.randn(3, heads + kv_heads, head_dim, generator=generator)[:, :heads]  # a strided view, as in the runner
    scale = head_dim ** -0.5
    output = paged_attention.paged_decode_attention(*(t.to(DEVICE) for t in (query, k_cache, v_cache, block_tables,
                                                                              key_counts)), block_size, scale, splits)
    output = output.cpu()
    expected = attention_over_gathered_keys(query, k_cache, v_cache, block_tables, key_counts, block_size, scale)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def dequantized(codes: torch.Tensor, scale: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    return (codes.view(torch.float8_e4m3fn) if kv_cache_dtype == "fp8" else codes).float() * scale


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_kernel_reads_an_8_bit_cache_as_attention_over_its_dequantized_keys(kv_cache_dtype):
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, block_size, num_blocks = 9, 3, 64, 16, 40
    (k_codes, k_scale), (v_codes, v_scale) = (
        encode_kv(torch.randn(kv_heads, num_blocks * block_size, head_dim, generator=generator) * 3, kv_cache_dtype)
        for _ in "kv")
    key_counts = torch.tensor([1, 37, 5 * block_size], dtype=torch.int32)
    block_tables = torch.stack([torch.randperm(num_blocks, generator=generator)[:12] for _ in key_counts]).int()
    query = torch.randn(3, heads, head_dim, generator=generator)
    scale = head_dim ** -0.5
    output = paged_attention.paged_decode_attention(
        *(t.to(DEVICE) for t in (query, k_codes, v_codes, block_tables, key_counts)), block_size, scale, 2,
        k_scale=k_scale.to(DEVICE), v_scale=v_scale.to(DEVICE))
    expected = attention_over_gathered_keys(query, dequantized(k_codes, k_scale, kv_cache_dtype),
                                            dequantized(v_codes, v_scale, kv_cache_dtype), block_tables,
                                            key_counts, block_size, scale)
    torch.testing.assert_close(output.cpu(), expected, atol=1e-5, rtol=1e-5)


def test_kernel_refuses_an_8_bit_cache_without_its_scales():
    codes = torch.zeros(1, 32, 16, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        paged_attention.paged_decode_attention(torch.zeros(1, 2, 16, device=DEVICE), codes, codes,
                                               torch.ones(1, 2, dtype=torch.int32, device=DEVICE),
                                               torch.ones(1, dtype=torch.int32, device=DEVICE), 16, 0.25)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_engine_decoding_an_8_bit_cache_through_the_kernel_equals_decoding_it_gathered(kv_cache_dtype):
    model = swiftkv_model("llama", 2).to(DEVICE)
    outputs = []
    for kernel in (None, paged_attention.paged_decode_attention):
        engine = engine_for(model, cuda_graphs=False, kv_cache_dtype=kv_cache_dtype)
        engine.runner.paged_kernel = kernel  # the gathered keys through PyTorch's attention, then the kernel
        outputs.append([output.token_ids for output in run(engine, prompts(3), GREEDY)])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("group_size", [1, 2])
def test_engine_decoding_through_the_kernel_equals_transformers(group_size):
    model = swiftkv_model("llama", group_size).to(DEVICE)
    engine = engine_for(model, cuda_graphs=False)
    engine.runner.paged_kernel = paged_attention.paged_decode_attention  # a GPU's (without graphs); on a CPU interpreted
    for prompt, output in zip(prompts(3), run(engine, prompts(3), GREEDY)):
        assert output.token_ids == hf_greedy(model, prompt, 10)


def test_graph_buckets_cover_every_batch_size_up_to_the_largest():
    assert batch_buckets(1) == [1]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert all(any(bucket >= size for bucket in batch_buckets(24)) for size in range(1, 25))
