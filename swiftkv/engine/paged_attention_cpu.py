"""Attention straight from the paged KV cache on a CPU: small C++ kernels for decode rows
(csrc/paged_attention_cpu.cpp) and for prompt chunks (csrc/prefill_attention_cpu.cpp).

PyTorch's fused SDPA kernel spends about 0.1 us per key on one query row here (SmolLM2's 9 query heads over 3
KV heads), several times the time to stream those keys from memory, so on long contexts attention became a
third of a decode step (docs/engine-decode.md has the design and the measurements). This kernel follows each
row's block table like the GPU's Triton kernel (engine/paged_attention.py): no gather, no contiguous-slots
requirement, every row of a batch in one call, split over (row, KV head, share of the keys) so one long row
keeps every thread busy, and the query heads that share a KV head read its keys once. AVX-512 (and
AVX512-BF16 for bf16 caches) where the CPU has it, plain loops elsewhere. The prompt kernel is a flash-attention
forward for bf16 on AVX512-BF16 (about 4x PyTorch's SDPA there, benchmarks/prompt_attention.py); the engine
uses SDPA for prompts elsewhere (`prefill_attention_is_fast`). Where both have their AVX512-BF16 paths the
engine stores K/V as the tiles those paths compute on (`tile_cache`, csrc/bf16_tiles.h) and writes them with
`write_tiled_kv_cache`: decode attention then runs without transposes (at 2048 keys 82.9 -> 49.5 us per
layer and row, benchmarks/decode_attention.py).

It is compiled on first use with the machine's C++ compiler (the one torch.compile needs too) through
`torch.utils.cpp_extension`, for this CPU (`-march=native`), and cached by torch under `TORCH_EXTENSIONS_DIR`
(~/.cache/torch_extensions): compiled once, then loaded. Where it cannot be built the engine logs why and
keeps its PyTorch paths (`available()` is False). It is a C++ operator, `torch.ops.swiftkv_cpu`, so neither
eager steps nor a torch.compile'd step (which calls it as one opaque kernel) go through Python per layer; the
same library holds the compiled step's KV-cache write (engine/compiled.py) for the same reason, and the bf16
product of a few rows that decode steps use (engine/small_batch_linear.py).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Optional

import torch

SOURCES = [Path(__file__).with_name("csrc") / name for name in
           ("paged_attention_cpu.cpp", "prefill_attention_cpu.cpp", "small_batch_linear_cpu.cpp")]
DISABLE_VARIABLE = "SWIFTKV_CPU_ATTENTION_KERNEL"  # "0": use PyTorch's attention paths instead
TILE = 16  # slots per tile of a tiled cache (csrc/bf16_tiles.h)
logger = logging.getLogger(__name__)


def _cpu_tag() -> str:
    """A short hash of this CPU's feature flags: the build is for this CPU (-march=native), so a cache directory
    shared with another kind of machine keeps one build per kind."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        flags = platform.machine() + platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=None)
def _build() -> bool:
    from torch.utils.cpp_extension import load

    try:
        load(name=f"swiftkv_paged_attention_cpu_{_cpu_tag()}", sources=[str(source) for source in SOURCES],
             is_python_module=False, extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as error:  # no compiler, no ninja, a failed build: the PyTorch paths still work
        logger.warning("the CPU paged-attention kernels could not be built (%s: %s); attention uses "
                       "PyTorch's kernels", type(error).__name__, (str(error).splitlines() or [""])[0])
        return False
    torch.library.register_fake("swiftkv_cpu::paged_decode_attention")(_output_like)
    torch.library.register_fake("swiftkv_cpu::prefill_attention")(_output_like)
    torch.library.register_fake("swiftkv_cpu::write_kv_cache")(lambda cache, first, last, slots, states: None)
    torch.library.register_fake("swiftkv_cpu::write_tiled_kv_cache")(
        lambda cache, first, last, slots, states, values, scales=None: None)
    torch.library.register_fake("swiftkv_cpu::small_batch_linear")(
        lambda input, weight, bias: input.new_empty(input.shape[0], weight.shape[0]))
    return True


def _output_like(query, *rest):
    """Both attention ops' output: `[rows, heads * d]` in the query's dtype."""
    return query.new_empty(query.shape[0], query.shape[1] * query.shape[2])


def built() -> bool:
    """Whether the library of CPU kernels is built (building it on first call), whichever of them are switched off."""
    return _build()


def available() -> bool:
    """Whether decode rows on a CPU go through the kernel (built on first call; off with
    SWIFTKV_CPU_ATTENTION_KERNEL=0)."""
    return os.environ.get(DISABLE_VARIABLE, "1") != "0" and _build()


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, key_counts: torch.Tensor, block_size: int,
                           scale: float, tiled: bool = False, k_scale: Optional[torch.Tensor] = None,
                           v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One query per row over its own keys, as the GPU kernel's function of the same name.

    query `[rows, heads, d]`; k_cache/v_cache one entry's `[kv_heads, slots, d]` (slot = block * block_size +
    offset); block_tables `[rows, >= max blocks]` int32; key_counts `[rows]` int32 (>= 1 each) ->
    `[rows, heads * d]` in the query's dtype; `tiled`: the caches are tiled (`tile_cache`). An int8 cache
    (tiled, bf16 queries) holds codes whose values are codes * k_scale / v_scale, `[kv_heads, slots, 1]` bf16.
    Call `available()` first (it builds the kernel)."""
    return torch.ops.swiftkv_cpu.paged_decode_attention(query, k_cache, v_cache, block_tables, key_counts,
                                                         block_size, scale, tiled, k_scale, v_scale)


def prefill_attention_is_fast(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `prefill_attention` has its vectorised path for this cache (bf16 on a CPU with AVX512-BF16, head
    size a multiple of 32); elsewhere it is a plain loop, slower than PyTorch's SDPA. Call `available()` first."""
    return torch.ops.swiftkv_cpu.prefill_attention_is_fast(dtype, head_dim)


def prefill_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                      keys: int, block_size: int, scale: float, tiled: bool = False,
                      k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A prompt chunk's queries `[n, heads, d]`, at positions `[keys - n, keys)`, causal over their sequence's
    first `keys` keys, read through its block table `[>= keys / block_size]` int32 from one entry's
    `[kv_heads, slots, d]` caches (tiled with `tiled`; int8 codes with `k_scale`/`v_scale`, as
    `paged_decode_attention`) -> `[n, heads * d]` in the query's dtype. Call `available()` first."""
    return torch.ops.swiftkv_cpu.prefill_attention(query, k_cache, v_cache, block_table, keys, block_size, scale,
                                                   tiled, k_scale, v_scale)


def tiled_cache_is_supported(dtype: torch.dtype, head_dim: int, block_size: int) -> bool:
    """Whether a cache of this dtype, head size and block size can be tiled: where the prompt kernel has its
    vectorised path and blocks hold whole tiles. Call `available()` first."""
    return prefill_attention_is_fast(dtype, head_dim) and block_size % TILE == 0


def tile_cache(cache: torch.Tensor, values: bool) -> torch.Tensor:
    """`[..., slots, d]` K (or V, `values`) in slot order -> the same slots tiled, as the kernels and
    `write_tiled_kv_cache` lay them out (csrc/bf16_tiles.h): per 16 slots, K as `[d / 2][16 slots][2]` (a
    pair of dimensions of 16 keys), V as `[8][d][2]` (a dimension of a pair of keys). The reference for the
    layout; the engine writes tiles in place."""
    *outer, slots, dim = cache.shape
    tiles = cache.reshape(*outer, slots // TILE, TILE, dim)
    if values:
        tiles = tiles.unflatten(-2, (TILE // 2, 2)).transpose(-1, -2)  # [..., 8, d, 2]
    else:
        tiles = tiles.unflatten(-1, (dim // 2, 2)).transpose(-3, -2)  # [..., d / 2, 16, 2]
    return tiles.reshape(cache.shape)


def write_tiled_kv_cache(cache: torch.Tensor, first: int, last: int, slots: torch.Tensor, states: torch.Tensor,
                         values: bool, scales: Optional[torch.Tensor] = None) -> None:
    """`states` `[entries, kv_heads, tokens, d]` (K, or V with `values`; of the cache's dtype) into the tiled cache
    entries `[first, last)` of `cache` `[entries, kv_heads, slots, d]` at `slots` `[tokens]`, in place. With
    `scales` (`[entries, kv_heads, slots, 1]` bf16), bf16 states are quantized into an int8 cache on the way, each
    token and head as `ModelRunner._encoded` does, and their scales written."""
    torch.ops.swiftkv_cpu.write_tiled_kv_cache(cache, first, last, slots, states, values, scales)
