"""Decode attention straight from the paged KV cache on a GPU: a Triton kernel that follows each row's block
table (no gather of K/V into a padded batch), split over the keys so that a few long rows still fill the GPU.

Its shapes depend only on the number of rows and the block tables' width, never on the contexts' lengths
(read from a tensor inside the kernel), so the same launch can be captured once in a CUDA graph and replayed
for every decode step (engine/cuda_graphs.py). Rows, splits, block size and the block tables' width are
runtime arguments: one compiled kernel per model shape and dtype serves every batch.

Each program takes one row, one KV head and one share (split) of the row's key tiles; it attends the query
heads that share that KV head to its tiles with an online softmax and writes its normalised partial output
and log-sum-exp; `paged_decode_attention` merges the splits (flash-decoding). An 8-bit cache (int8 codes, or
the bytes of fp8 e4m3, each with a scale per token and head) is read as it is stored, half the bytes of bf16:
the codes convert exactly to the query's dtype, the keys' scales multiply the scores and the values' scales the
probabilities, so no dequantized copy of the context is made. On CPU tensors the same kernel
runs in Triton's interpreter (`TRITON_INTERPRET=1` before Triton is imported; slow, numpy underneath): that
is how the tests check it without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch

TILE = 16  # keys per inner step; tl.dot wants every side >= 16
FLOAT_CACHE, INT8_CODES, FP8_BYTES = 0, 1, 2  # what the kernel's `codes` says a cache holds

if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _values(stored, fp8_values, codes: tl.constexpr):
        """A tile as stored -> numbers: a float cache's as they are, int8 codes as they are (exact in any float
        dtype), fp8 bytes looked up in the 256 e4m3 values (a table, since Triton's interpreter and GPUs before Ada
        and Hopper have no fp8 conversion; masked slots load byte 0, which is 0.0)."""
        if codes == 2:  # FP8_BYTES
            return tl.load(fp8_values + stored.to(tl.int32))
        return stored

    # Integers that change from step to step are not specialized on (Triton otherwise compiles a variant for
    # values of 1 and multiples of 16), and each recompile in the middle of serving stalls a step.
    @triton.jit(do_not_specialize=["table_row_stride", "out_row_stride", "out_head_stride", "lse_row_stride",
                                   "lse_head_stride", "block_size", "num_splits"])
    def _paged_decode_kernel(query, k_cache, v_cache, block_tables, key_counts, partial_out, partial_lse, scale,
                             k_scale, v_scale, fp8_values,
                             query_row_stride, query_head_stride, cache_head_stride, cache_slot_stride,
                             scale_head_stride, scale_slot_stride,
                             table_row_stride, out_row_stride, out_head_stride, out_split_stride,
                             lse_row_stride, lse_head_stride,
                             block_size, num_splits, group: tl.constexpr, group_pad: tl.constexpr,
                             head_dim: tl.constexpr, head_pad: tl.constexpr, tile: tl.constexpr,
                             precision: tl.constexpr, codes: tl.constexpr):
        row, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        keys = tl.load(key_counts + row)
        tiles = tl.cdiv(keys, tile)
        per_split = tl.cdiv(tiles, num_splits)
        first, last = split * per_split, tl.minimum(split * per_split + per_split, tiles)

        g, d, t = tl.arange(0, group_pad), tl.arange(0, head_pad), tl.arange(0, tile)
        heads = kv_head * group + g
        q_mask = (g < group)[:, None] & (d < head_dim)[None, :]
        q = tl.load(query + row * query_row_stride + heads[:, None] * query_head_stride + d[None, :],
                    mask=q_mask, other=0.0)
        best = tl.full([group_pad], float("-inf"), tl.float32)
        total = tl.zeros([group_pad], tl.float32)
        acc = tl.zeros([group_pad, head_pad], tl.float32)
        step = first
        while step < last:  # a while loop: Triton's interpreter cannot range() over loaded values
            position = step * tile + t
            valid = position < keys
            block = tl.load(block_tables + row * table_row_stride + position // block_size, mask=valid, other=0)
            slot = block * block_size + position % block_size
            offsets = kv_head * cache_head_stride + slot[:, None] * cache_slot_stride + d[None, :]
            kv_mask = valid[:, None] & (d < head_dim)[None, :]
            k = _values(tl.load(k_cache + offsets, mask=kv_mask, other=0), fp8_values, codes).to(q.dtype)
            scores = tl.dot(q, tl.trans(k), input_precision=precision) * scale  # [group_pad, tile], float32
            scale_offsets = kv_head * scale_head_stride + slot * scale_slot_stride
            if codes != 0:  # 8-bit: codes x scale per key: the scale factors out of each key's dot products
                scores *= tl.load(k_scale + scale_offsets, mask=valid, other=0.0).to(tl.float32)[None, :]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            rescale = tl.exp(best - new_best)
            weights = tl.exp(scores - new_best[:, None])
            total = total * rescale + tl.sum(weights, 1)
            v = _values(tl.load(v_cache + offsets, mask=kv_mask, other=0), fp8_values, codes).to(q.dtype)
            if codes != 0:  # each value's scale folds into its probability
                weights *= tl.load(v_scale + scale_offsets, mask=valid, other=0.0).to(tl.float32)[None, :]
            acc = acc * rescale[:, None] + tl.dot(weights.to(q.dtype), v, input_precision=precision)
            best = new_best
            step += 1
        empty = total == 0.0  # a split with no keys: weight 0 when the splits merge
        out = acc / tl.where(empty, 1.0, total)[:, None]
        lse = tl.where(empty, float("-inf"), best + tl.log(tl.where(empty, 1.0, total)))
        tl.store(partial_out + row * out_row_stride + heads[:, None] * out_head_stride + split * out_split_stride
                 + d[None, :], out, mask=q_mask)
        tl.store(partial_lse + row * lse_row_stride + heads * lse_head_stride + split, lse, mask=g < group)


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernel(device: torch.device):
    """The compiled kernel on a GPU; on a CPU the same kernel, which only Triton's interpreter can run."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("paged_decode_attention runs on CUDA tensors, or on CPU tensors in Triton's "
                           "interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    return _paged_decode_kernel


@functools.lru_cache
def _multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessor count (8 for the interpreter on a CPU), read once: splits are chosen per layer."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def default_splits(rows: int, kv_heads: int, device: torch.device) -> int:
    """Enough key splits that rows x KV heads x splits fills the GPU's multiprocessors twice, at most 16."""
    return max(1, min(16, -(-2 * _multiprocessors(device) // (rows * kv_heads))))


@functools.lru_cache
def _fp8_values(device: torch.device) -> torch.Tensor:
    """The float32 value of each of the 256 fp8 e4m3 bytes (the two NaN bytes are never written)."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().to(device)


def _pow2(value: int) -> int:
    return max(16, 1 << (value - 1).bit_length())


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, key_counts: torch.Tensor, block_size: int, scale: float,
                           num_splits: Optional[int] = None, k_scale: Optional[torch.Tensor] = None,
                           v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One query per row over its own keys.

    query `[rows, heads, d]`; k_cache/v_cache one entry's `[kv_heads, slots, d]` (slot = block * block_size +
    offset) in the query's dtype, or 8-bit with k_scale/v_scale `[kv_heads, slots, 1]`: int8 codes, or uint8
    holding fp8 e4m3 bytes (engine/model_runner.py `encode_kv`); block_tables `[rows, >= max blocks]` int32;
    key_counts `[rows]` int32 (>= 1 each) -> `[rows, heads * d]` in the query's dtype."""
    rows, heads, head_dim = query.shape
    kv_heads = k_cache.shape[0]
    if k_cache.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("paged_decode_attention needs the last dimension of query and cache contiguous")
    codes = {torch.int8: INT8_CODES, torch.uint8: FP8_BYTES}.get(k_cache.dtype, FLOAT_CACHE)
    if (codes != FLOAT_CACHE) != (k_scale is not None and v_scale is not None):
        raise ValueError("an 8-bit (int8 or fp8-byte) cache needs k_scale and v_scale, a float cache neither")
    if codes == FLOAT_CACHE:
        k_scale = v_scale = k_cache  # not read
    group = heads // kv_heads
    splits = num_splits or default_splits(rows, kv_heads, query.device)
    partial_out = torch.empty(rows, heads, splits, head_dim, dtype=torch.float32, device=query.device)
    partial_lse = torch.empty(rows, heads, splits, dtype=torch.float32, device=query.device)
    _kernel(query.device)[(rows, kv_heads, splits)](
        query, k_cache, v_cache, block_tables, key_counts, partial_out, partial_lse, scale,
        k_scale, v_scale, _fp8_values(query.device),
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_scale.stride(0), k_scale.stride(1), block_tables.stride(0),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1),
        block_size, splits, group=group, group_pad=_pow2(group), head_dim=head_dim, head_pad=_pow2(head_dim),
        tile=TILE, codes=codes,
        precision="ieee" if query.dtype == torch.float32 else "tf32")  # float32 in full: no TF32 rounding
    weights = torch.softmax(partial_lse, dim=-1)  # each split's share of the row's softmax mass
    output = (weights[..., None] * partial_out).sum(2)
    return output.to(query.dtype).reshape(rows, heads * head_dim)
