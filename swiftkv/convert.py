"""Turn a base Hugging Face decoder into a SwiftKV model (weights shared, new projections initialized).

Initialization follows the paper: `{q,k,v}_proj_swiftkv` start as the layer's own `{q,k,v}_proj`
(for an AcrossKV group, the first layer's k/v) and `norm_swiftkv` as `input_layernorm` of layer `l`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from swiftkv.checkpoint import output_folder, save_checkpoint
from swiftkv.config import SWIFTKV_CONFIG_CLASSES, SwiftKVConfigError, resolve_num_key_value_layers
from swiftkv.models import SWIFTKV_MODEL_CLASSES

_NOT_CONFIG_FIELDS = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map")


def swiftkv_config_from_base(base_config: PretrainedConfig, num_key_value_layers: int | float | str,
                             key_value_group_size: int = 1, swiftkv: bool = True) -> PretrainedConfig:
    """The `*_swiftkv` config of `base_config` (clear error for unsupported families or layouts)."""
    model_type = base_config.model_type
    if model_type.endswith("_swiftkv"):
        raise SwiftKVConfigError(f"the model is already a {model_type} checkpoint; convert its base model instead")
    if model_type not in SWIFTKV_CONFIG_CLASSES:
        raise SwiftKVConfigError(
            f"model_type {model_type!r} is not supported; SwiftKV supports {sorted(SWIFTKV_CONFIG_CLASSES)}"
        )
    if model_type == "mistral" and getattr(base_config, "sliding_window", None) is not None:
        raise SwiftKVConfigError(
            "Mistral configs convert as Llama only without sliding-window attention "
            f"(this one has sliding_window={base_config.sliding_window})"
        )
    fields = {k: v for k, v in base_config.to_dict().items() if k not in _NOT_CONFIG_FIELDS}
    config_class = SWIFTKV_CONFIG_CLASSES[model_type]
    num_layers = resolve_num_key_value_layers(num_key_value_layers, base_config.num_hidden_layers)
    config = config_class(swiftkv=swiftkv, num_key_value_layers=num_layers,
                          key_value_group_size=key_value_group_size, **fields)
    config.architectures = [SWIFTKV_MODEL_CLASSES[config.model_type].__name__]
    return config


def _copy_parameter(source: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(source.detach().clone(), requires_grad=source.requires_grad)


def initialize_swiftkv_weights(model: PreTrainedModel) -> None:
    """Paper initialization of every SwiftKV parameter from the base weights the model already holds."""
    config = model.config
    layers = model.model.layers
    if config.num_key_value_layers == config.num_hidden_layers:
        return
    model.model.norm_swiftkv.weight = _copy_parameter(layers[config.num_key_value_layers].input_layernorm.weight)
    for layer_idx in range(config.num_key_value_layers, config.num_hidden_layers):
        attention = layers[layer_idx].self_attn
        pairs = [("q_proj_swiftkv", "q_proj")]
        if config.is_group_leader(layer_idx):
            pairs += [("k_proj_swiftkv", "k_proj"), ("v_proj_swiftkv", "v_proj")]
        for new_name, base_name in pairs:
            new, base = getattr(attention, new_name), getattr(attention, base_name)
            new.weight = _copy_parameter(base.weight)
            if base.bias is not None:
                new.bias = _copy_parameter(base.bias)


def convert_to_swiftkv(base_model: PreTrainedModel, num_key_value_layers: int | float | str,
                       key_value_group_size: int = 1) -> PreTrainedModel:
    """SwiftKV model that shares `base_model`'s tensors (no copy of the base weights is made)."""
    config = swiftkv_config_from_base(base_model.config, num_key_value_layers, key_value_group_size)
    config._attn_implementation = base_model.config._attn_implementation
    with torch.device("meta"):
        model = SWIFTKV_MODEL_CLASSES[config.model_type](config)
    missing, unexpected = model.load_state_dict(base_model.state_dict(), strict=False, assign=True)
    not_swiftkv = [name for name in missing if "swiftkv" not in name and name != "lm_head.weight"]
    if not_swiftkv or unexpected:
        raise SwiftKVConfigError(f"base weights do not fit the SwiftKV model: missing {not_swiftkv}, "
                                 f"unexpected {unexpected}")
    model.model.rotary_emb = base_model.model.rotary_emb  # non-persistent buffers are not in a state dict
    initialize_swiftkv_weights(model)
    model.tie_weights()
    still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"conversion left weights uninitialized: {still_meta}")
    model.generation_config = base_model.generation_config
    return model.eval()


def convert_checkpoint(model: str, out_dir: str | Path, num_key_value_layers: int | float | str = 0.5,
                       key_value_group_size: int = 1, dtype: str = "auto",
                       max_shard_size: str = "2GB") -> Path:
    """Load `model` (alias, directory, GGUF or hub id), convert it, and save it with its tokenizer."""
    from swiftkv.loading import load_model, load_tokenizer

    out_dir = output_folder(out_dir)
    base = load_model(model, dtype=dtype)
    swiftkv_model = convert_to_swiftkv(base, num_key_value_layers, key_value_group_size)
    swiftkv_model.config._name_or_path = str(out_dir)
    return save_checkpoint(swiftkv_model, out_dir, load_tokenizer(model), max_shard_size=max_shard_size)
