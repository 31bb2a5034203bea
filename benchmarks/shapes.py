"""Random-weight models of a named architecture, for timing where the real checkpoint is not at hand.

Speed does not depend on weight values, so a GPU run (where only this repository travels, not the GGUF)
times a model of SmolLM2-135M's or Llama-3.1-8B's exact shape, built on the device in seconds.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100_000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500_000.0,
                         max_position_embeddings=131_072, tie_word_embeddings=False),
}


def random_model(shape: str, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    """A `shape` model with random weights, created directly on `device` in `dtype` (no float32 copy)."""
    config = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         attn_implementation="sdpa")
    default_dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def swiftkv_layer_counts(num_hidden_layers: int) -> dict[int, int]:
    """SwiftKV-50% `num_key_value_layers` per AcrossKV group size: half the layers, rounded up until the
    SwiftKV layers split into whole groups."""
    counts = {}
    for group_size in (1, 2):
        layers = num_hidden_layers // 2
        while (num_hidden_layers - layers) % group_size:
            layers += 1
        counts[group_size] = layers
    return counts
