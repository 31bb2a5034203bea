"""Checkpoint format: the reference `*_swiftkv` layout, bit-identical round trips, clear errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from swiftkv.checkpoint import CheckpointError, save_checkpoint, validate_checkpoint
from swiftkv.config import LlamaSwiftKVConfig, SwiftKVConfigError
from swiftkv.convert import convert_to_swiftkv
from swiftkv.loading import load_model

from conftest import TINY, make_base_model, perturb_swiftkv_weights


@pytest.fixture
def checkpoint_dir(tmp_path, family):
    model = convert_to_swiftkv(make_base_model(family), num_key_value_layers=0.5, key_value_group_size=3)
    perturb_swiftkv_weights(model)
    return save_checkpoint(model, tmp_path / "ckpt"), model


def test_checkpoint_uses_reference_names(checkpoint_dir, family):
    path, _ = checkpoint_dir
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == f"{family}_swiftkv"
    assert config["architectures"] == [f"{family.capitalize()}SwiftKVForCausalLM"]
    assert (config["swiftkv"], config["num_key_value_layers"], config["key_value_group_size"]) == (True, 3, 3)
    names = set(load_file(path / "model.safetensors"))
    assert "model.norm_swiftkv.weight" in names
    assert {f"model.layers.3.self_attn.{p}_proj_swiftkv.weight" for p in "qkv"} <= names
    assert "model.layers.4.self_attn.q_proj_swiftkv.weight" in names
    assert "model.layers.4.self_attn.k_proj_swiftkv.weight" not in names
    assert "model.layers.0.self_attn.q_proj.weight" in names  # the base projections stay
    if family == "qwen2":
        assert "model.layers.3.self_attn.k_proj_swiftkv.bias" in names


def test_save_load_round_trip_is_bit_identical(checkpoint_dir):
    path, model = checkpoint_dir
    loaded = load_model(str(path))
    assert type(loaded) is type(model)
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for name in original:
        assert torch.equal(original[name], reloaded[name]), name
    input_ids = torch.randint(3, 96, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, loaded(input_ids).logits)


def test_auto_classes_load_without_trust_remote_code(checkpoint_dir):
    path, model = checkpoint_dir
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert type(loaded) is type(model)


def test_config_with_groups_that_do_not_divide_is_rejected():
    with pytest.raises(SwiftKVConfigError, match=r"key_value_group_size.*use num_key_value_layers in \[2, 4\]"):
        LlamaSwiftKVConfig(**TINY | {"num_hidden_layers": 6}, swiftkv=True, num_key_value_layers=3,
                           key_value_group_size=2)


@pytest.mark.parametrize("field, value, message", [
    ("num_key_value_layers", 0, "num_key_value_layers=0 must be between 1 and num_hidden_layers=6"),
    ("num_key_value_layers", 2.5, "num_key_value_layers must be a whole number, got 2.5"),
    ("num_key_value_layers", "3", "num_key_value_layers must be a whole number, got '3'"),
    ("key_value_group_size", 0, "key_value_group_size=0 must be >= 1"),
])
def test_checkpoint_config_with_a_bad_count_names_it_instead_of_rounding_or_defaulting(checkpoint_dir, field, value,
                                                                                     message):
    path, _ = checkpoint_dir
    config = json.loads((path / "config.json").read_text())
    config[field] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"config.json: {re.escape(message)}"):
        load_model(str(path))


def test_checkpoint_config_with_bad_groups_names_the_field(checkpoint_dir):
    path, _ = checkpoint_dir
    config = json.loads((path / "config.json").read_text())
    config["key_value_group_size"] = 2
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json.*key_value_group_size"):
        load_model(str(path))


def test_missing_weight_is_named(checkpoint_dir):
    path, _ = checkpoint_dir
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.3.self_attn.k_proj_swiftkv.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing weights: model\.layers\.3\.self_attn\.k_proj_swiftkv\.weight"):
        load_model(str(path))


def test_wrong_shape_is_named(checkpoint_dir):
    path, _ = checkpoint_dir
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm_swiftkv.weight"] = torch.ones(7)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.norm_swiftkv\.weight has shape \[7\], config\.json implies \[64\]"):
        load_model(str(path))


def test_corrupt_weights_file_is_named(checkpoint_dir):
    path, _ = checkpoint_dir
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        validate_checkpoint(path)


def test_invalid_config_json_is_named(checkpoint_dir):
    path, _ = checkpoint_dir
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        validate_checkpoint(path)


def test_sharded_checkpoint_round_trips(tmp_path):
    model = convert_to_swiftkv(make_base_model("llama"), 3)
    path = save_checkpoint(model, tmp_path / "sharded", max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    loaded = load_model(str(path))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
