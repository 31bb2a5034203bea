"""One engine configuration: the Python API, the CLI flags and the server all read their defaults here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class EngineConfig:
    dtype: str = "bfloat16"
    kv_cache_memory_gb: float = 1.0
    block_size: int = 16
    max_num_seqs: int = 32             # sequences decoding at once
    max_prefill_tokens: Optional[int] = None  # prompt tokens per step; None: 1024 on a CPU, 8192 on a GPU
    kv_cache_dtype: str = "auto"       # "int8" / "fp8" (e4m3): 8-bit K/V with per-token scales, ~2x the tokens
    reserve_output_tokens: bool = True  # admit a prompt only with KV room for every max_tokens: no preemption
    device: str = "auto"               # auto: CUDA when present; cpu, cuda, cuda:N
    weights: str = "auto"              # "int8" / "int4": weight-only quantized projections (engine/quantized.py)
    cuda_graphs: bool = True           # on a GPU, replay decode steps from CUDA graphs (engine/cuda_graphs.py)
    compile_decode: bool = False       # on a CPU, torch.compile decode-only steps (engine/compiled.py)
