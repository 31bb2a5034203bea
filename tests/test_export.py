"""`swiftkv export --for vllm`: the weights vLLM + ArcticInference loads, named and shaped as its loader maps
them, computing what the source checkpoint computes; families it cannot load are refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from swiftkv.checkpoint import checkpoint_tensor_shapes, save_checkpoint
from swiftkv.cli import main
from swiftkv.convert import convert_to_swiftkv
from swiftkv.export import ExportError, export_for_vllm

from conftest import make_base_model, make_tiny_tokenizer, perturb_swiftkv_weights

# Transcribed from snowflakedb/ArcticInference, arctic_inference/vllm/swiftkv/llama_swiftkv.py at commit
# 0a053cbb5532e4bfba7ca6f92a66280a186628da: `LlamaSwiftKVModel` builds `LlamaDecoderLayer` for layers < l
# (`load_weights` maps q/k/v_proj -> qkv_proj, gate/up_proj -> gate_up_proj), `LlamaSwiftKVDecoderLayer` for
# layers >= l (q_proj_swiftkv, o_proj, the MLP, two norms; no q/k/v_proj), `norm_swiftkv` and `norm` always,
# and `kv_fanout`, which loads `layers.{j}.self_attn.{k,v}_proj_swiftkv` for j in range(l, L, group size);
# its decode runner splits the K/V into L - l chunks, one per layer, so only group size 1 computes correctly.
def arctic_inference_parameters(config) -> dict[str, tuple[int, ...]]:
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q_size, kv_size, inner = heads * head_dim, kv_heads * head_dim, config.intermediate_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,),
              "model.norm_swiftkv.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}"
        shapes.update({f"{prefix}.self_attn.o_proj.weight": (hidden, q_size),
                       f"{prefix}.mlp.gate_proj.weight": (inner, hidden), f"{prefix}.mlp.up_proj.weight": (inner, hidden),
                       f"{prefix}.mlp.down_proj.weight": (hidden, inner),
                       f"{prefix}.input_layernorm.weight": (hidden,),
                       f"{prefix}.post_attention_layernorm.weight": (hidden,)})
        if index < config.num_key_value_layers:
            shapes.update({f"{prefix}.self_attn.q_proj.weight": (q_size, hidden),
                           f"{prefix}.self_attn.k_proj.weight": (kv_size, hidden),
                           f"{prefix}.self_attn.v_proj.weight": (kv_size, hidden)})
        else:
            shapes.update({f"{prefix}.self_attn.q_proj_swiftkv.weight": (q_size, hidden),
                           f"{prefix}.self_attn.k_proj_swiftkv.weight": (kv_size, hidden),
                           f"{prefix}.self_attn.v_proj_swiftkv.weight": (kv_size, hidden)})
    return shapes


@pytest.fixture
def across_kv_checkpoint(tmp_path):
    """A distilled-looking AcrossKV checkpoint: groups of 2, SwiftKV weights moved away from their start."""
    model = convert_to_swiftkv(make_base_model("llama"), num_key_value_layers=2, key_value_group_size=2)
    perturb_swiftkv_weights(model)
    return save_checkpoint(model, tmp_path / "swiftkv", make_tiny_tokenizer()), model


def test_export_has_exactly_the_parameters_arctic_inference_loads(across_kv_checkpoint, tmp_path):
    checkpoint, _ = across_kv_checkpoint
    out = export_for_vllm(checkpoint, tmp_path / "vllm")
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("llama_swiftkv", ["LlamaSwiftKVForCausalLM"])
    assert (config["key_value_group_size"], config["swiftkv"], config["torch_dtype"]) == (1, True, "bfloat16")
    assert (out / "tokenizer.json").is_file()

    class Config:  # what ArcticInference reads from config.json
        def __init__(self, fields):
            self.__dict__.update(fields)

    assert checkpoint_tensor_shapes(out) == arctic_inference_parameters(Config(config))
    with safe_open(next(out.glob("*.safetensors")), framework="pt") as shard:
        assert shard.get_tensor(shard.keys()[0]).dtype == torch.bfloat16


def test_exported_model_computes_what_the_across_kv_source_computes(across_kv_checkpoint, tmp_path):
    checkpoint, source = across_kv_checkpoint
    out = export_for_vllm(checkpoint, tmp_path / "vllm", dtype="float32")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()  # the unused base q/k/v of layers >= l are new
    assert exported.config.key_value_group_size == 1
    input_ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids).logits, source(input_ids).logits)
    members = [exported.model.layers[i].self_attn.k_proj_swiftkv.weight for i in (2, 3)]
    assert torch.equal(members[0], members[1])  # layer 3 got its leader's projection


def test_export_writes_shards_with_an_index(across_kv_checkpoint, tmp_path):
    checkpoint, _ = across_kv_checkpoint
    out = export_for_vllm(checkpoint, tmp_path / "vllm", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(checkpoint_tensor_shapes(out))


@pytest.mark.parametrize("make_checkpoint, reason", [
    (lambda: convert_to_swiftkv(make_base_model("qwen2"), 2), "ArcticInference registers only LlamaSwiftKVForCausalLM"),
    (lambda: make_base_model("llama"), "not a SwiftKV checkpoint"),
    (lambda: convert_to_swiftkv(make_base_model("llama"), 6), "no layer skips prefill"),  # l = L
])
def test_checkpoints_vllm_cannot_serve_are_refused_with_the_reason(make_checkpoint, reason, tmp_path):
    checkpoint = save_checkpoint(make_checkpoint(), tmp_path / "in", make_tiny_tokenizer())
    with pytest.raises(ExportError, match=reason):
        export_for_vllm(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_command_line(across_kv_checkpoint, tmp_path, capsys):
    checkpoint, _ = across_kv_checkpoint
    assert main(["export", str(checkpoint), str(tmp_path / "vllm"), "--for", "vllm"]) == 0
    assert "vllm serve" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
