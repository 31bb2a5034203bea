"""Export a SwiftKV checkpoint in the layout vLLM + Snowflake's ArcticInference plugin loads.

ArcticInference (`arctic_inference/vllm/swiftkv/llama_swiftkv.py`) registers `LlamaSwiftKVForCausalLM` only,
builds its decoder from `num_key_value_layers`, and its decode path splits the SingleInputKV projection into
one K/V pair per layer `>= l`. So the export:
* accepts the Llama family (`llama_swiftkv`) only: vLLM has no loader for `qwen2_swiftkv`;
* expands AcrossKV: every layer `>= l` gets its group leader's `k_proj_swiftkv` / `v_proj_swiftkv` and the
  config says `key_value_group_size: 1` (the same model; the KV-memory saving of AcrossKV is not kept there);
* writes `norm_swiftkv`, `swiftkv: true`, and leaves out the base `q/k/v_proj` of layers `>= l`, which
  SwiftKV never runs and the plugin's layers do not have;
* casts to the chosen dtype and writes sharded safetensors with an index, plus the tokenizer files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from swiftkv.checkpoint import output_folder, read_checkpoint_config
from swiftkv.loading import DTYPES, load_model

VLLM_MODEL_TYPES = {"llama_swiftkv": "LlamaSwiftKVForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")


class ExportError(ValueError):
    """A checkpoint the target engine cannot serve; the message says why."""


def vllm_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights as ArcticInference names them, AcrossKV expanded (one K/V projection per layer)."""
    config = model.config
    first_swiftkv = config.num_key_value_layers
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and int(parts[2]) >= first_swiftkv and parts[4] in (
                "q_proj", "k_proj", "v_proj", "k_proj_swiftkv", "v_proj_swiftkv"):
            continue  # base projections SwiftKV never runs; K/V projections are re-added per layer below
        state[name] = tensor
    leaders = config.group_leaders()
    for layer_index in range(first_swiftkv, config.num_hidden_layers):
        leader = model.model.layers[leaders[(layer_index - first_swiftkv) // config.key_value_group_size]].self_attn
        for projection in ("k_proj_swiftkv", "v_proj_swiftkv"):
            for kind, tensor in getattr(leader, projection).state_dict().items():
                state[f"model.layers.{layer_index}.self_attn.{projection}.{kind}"] = tensor.clone()  # own storage
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def vllm_config(config, dtype: torch.dtype) -> dict:
    fields = config.to_dict()
    fields.update(key_value_group_size=1, swiftkv=True, architectures=[VLLM_MODEL_TYPES[config.model_type]],
                  torch_dtype=str(dtype).removeprefix("torch."), dtype=str(dtype).removeprefix("torch."))
    fields.pop("_name_or_path", None)
    return fields


def check_exportable(config) -> None:
    model_type = config.model_type
    if not model_type.endswith("_swiftkv"):
        raise ExportError(f"not a SwiftKV checkpoint (model_type {model_type!r}): vLLM serves a base model as it "
                          "is; convert and distill it first")
    if model_type not in VLLM_MODEL_TYPES:
        raise ExportError(f"model_type {model_type!r} cannot be exported for vLLM: ArcticInference registers only "
                          f"{', '.join(VLLM_MODEL_TYPES.values())} ({', '.join(VLLM_MODEL_TYPES)}); serve this "
                          "checkpoint with `swiftkv serve`")
    if config.num_key_value_layers >= config.num_hidden_layers:
        raise ExportError(f"num_key_value_layers = num_hidden_layers = {config.num_hidden_layers}: no layer "
                          "skips prefill; serve the base model instead")


def export_for_vllm(checkpoint: str | Path, out_dir: str | Path, dtype: str = "bfloat16",
                    max_shard_size: str = "5GB") -> Path:
    """Write `checkpoint` (a `swiftkv convert`/`distill` output) to `out_dir` for vLLM + ArcticInference."""
    checkpoint, out_dir = Path(checkpoint), output_folder(out_dir)
    if not checkpoint.is_dir():
        raise ExportError(f"{checkpoint} is not a checkpoint folder (`swiftkv convert` or `distill` output)")
    check_exportable(read_checkpoint_config(checkpoint))
    torch_dtype = DTYPES[dtype]
    model = load_model(str(checkpoint), dtype=torch_dtype)
    state = {name: tensor.to(torch_dtype).contiguous() for name, tensor in vllm_state_dict(model).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for file_name, names in shards.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, out_dir / file_name, metadata={"format": "pt"})
    if shards.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": shards.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(vllm_config(model.config, torch_dtype), indent=2))
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, out_dir / name)
    return out_dir
