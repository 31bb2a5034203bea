"""Conversion: paper initialization, layer-count parsing, supported families."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from swiftkv.config import SwiftKVConfigError, resolve_num_key_value_layers
from swiftkv.convert import convert_to_swiftkv

from conftest import make_base_model


def test_new_projections_start_from_the_layers_own_weights(base_model):
    model = convert_to_swiftkv(base_model, num_key_value_layers=2, key_value_group_size=2)
    layers = model.model.layers
    assert torch.equal(model.model.norm_swiftkv.weight, layers[2].input_layernorm.weight)
    for layer_idx in range(2, 6):
        attention = layers[layer_idx].self_attn
        assert torch.equal(attention.q_proj_swiftkv.weight, attention.q_proj.weight)
    for leader in (2, 4):
        attention = layers[leader].self_attn
        assert torch.equal(attention.k_proj_swiftkv.weight, attention.k_proj.weight)
        assert torch.equal(attention.v_proj_swiftkv.weight, attention.v_proj.weight)
        if attention.k_proj.bias is not None:
            assert torch.equal(attention.k_proj_swiftkv.bias, attention.k_proj.bias)


def test_conversion_shares_base_tensors_and_new_ones_are_independent(base_model):
    model = convert_to_swiftkv(base_model, 3)
    assert model.model.embed_tokens.weight.data_ptr() == base_model.model.embed_tokens.weight.data_ptr()
    q = model.model.layers[3].self_attn
    assert q.q_proj_swiftkv.weight.data_ptr() != q.q_proj.weight.data_ptr()


def test_all_layers_kept_is_the_base_model(base_model):
    model = convert_to_swiftkv(base_model, num_key_value_layers=6)
    input_ids = torch.randint(3, 96, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, base_model(input_ids).logits)


@pytest.mark.parametrize("value, expected", [("0.5", 15), (0.5, 15), ("16", 16), (16, 16), ("1.0", 30), (0.25, 8)])
def test_num_key_value_layers_accepts_counts_and_fractions(value, expected):
    assert resolve_num_key_value_layers(value, 30) == expected


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "abc"])
def test_bad_num_key_value_layers_is_rejected(value):
    with pytest.raises((SwiftKVConfigError, ValueError)):
        resolve_num_key_value_layers(value, 30)


def test_unsupported_family_is_rejected_with_the_supported_list():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(SwiftKVConfigError, match=r"'gpt2' is not supported; SwiftKV supports \['llama', 'mistral', 'qwen2'\]"):
        convert_to_swiftkv(gpt2, 1)


def test_sliding_window_mistral_is_rejected():
    model = make_base_model("mistral")
    model.config.sliding_window = 16
    with pytest.raises(SwiftKVConfigError, match="sliding_window=16"):
        convert_to_swiftkv(model, 3)
