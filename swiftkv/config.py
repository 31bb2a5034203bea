"""SwiftKV configuration: the base family's config plus three fields, in Snowflake's `*_swiftkv` format.

`num_key_value_layers = l` keeps layers `0..l-1` as they are; layers `l..L-1` take their keys and values
from one hidden state (SingleInputKV), and consecutive groups of `key_value_group_size` of them share one
KV cache entry (AcrossKV). `swiftkv = False` runs the checkpoint exactly as its base model.
"""

from __future__ import annotations

from transformers import LlamaConfig, Qwen2Config


class SwiftKVConfigError(ValueError):
    """A SwiftKV setting that cannot describe a model; the message names the field and the fix."""


def resolve_num_key_value_layers(value: float | int | str, num_hidden_layers: int) -> int:
    """Turn `16`, `"16"`, `0.5` or `"0.5"` into a layer count (a fraction is of `num_hidden_layers`)."""
    number = float(value)
    if number <= 0:
        raise SwiftKVConfigError(f"num_key_value_layers must be positive, got {value!r}")
    if number < 1 or (isinstance(value, str) and "." in value):
        if number > 1:
            raise SwiftKVConfigError(f"num_key_value_layers {value!r} is neither a whole layer count nor a fraction <= 1")
        return max(1, round(number * num_hidden_layers))
    if not number.is_integer():
        raise SwiftKVConfigError(f"num_key_value_layers {value!r} is neither a whole layer count nor a fraction <= 1")
    return int(number)


def valid_num_key_value_layers(num_hidden_layers: int, key_value_group_size: int) -> list[int]:
    """All `l` that leave a whole number of AcrossKV groups: `(L - l) % g == 0`."""
    return [l for l in range(1, num_hidden_layers + 1) if (num_hidden_layers - l) % key_value_group_size == 0]


def validate_swiftkv_fields(num_hidden_layers: int, num_key_value_layers: int, key_value_group_size: int) -> None:
    """Raise `SwiftKVConfigError` naming the field when the SwiftKV layout is impossible."""
    if not 1 <= num_key_value_layers <= num_hidden_layers:
        raise SwiftKVConfigError(
            f"num_key_value_layers={num_key_value_layers} must be between 1 and num_hidden_layers={num_hidden_layers}"
        )
    if key_value_group_size < 1:
        raise SwiftKVConfigError(f"key_value_group_size={key_value_group_size} must be >= 1")
    swiftkv_layers = num_hidden_layers - num_key_value_layers
    if swiftkv_layers % key_value_group_size != 0:
        valid = valid_num_key_value_layers(num_hidden_layers, key_value_group_size)
        nearest = sorted(valid, key=lambda l: abs(l - num_key_value_layers))[:2]
        raise SwiftKVConfigError(
            f"(num_hidden_layers - num_key_value_layers) % key_value_group_size must be 0, but "
            f"({num_hidden_layers} - {num_key_value_layers}) % {key_value_group_size} = "
            f"{swiftkv_layers % key_value_group_size}; use num_key_value_layers in {sorted(nearest)} "
            f"or another key_value_group_size"
        )


def _whole_number(name: str, value, default: int) -> int:
    """A config.json count: absent (None) means `default`; 0, 15.5 or "16" are errors, not rounded or defaulted."""
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SwiftKVConfigError(f"{name} must be a whole number, got {value!r}")
    return value


class SwiftKVConfigMixin:
    """Fields and layer arithmetic shared by every `*_swiftkv` config."""

    def _init_swiftkv(self, swiftkv: bool, num_key_value_layers: int | None, key_value_group_size: int | None) -> None:
        self.swiftkv = bool(swiftkv)
        self.num_key_value_layers = _whole_number("num_key_value_layers", num_key_value_layers, self.num_hidden_layers)
        self.key_value_group_size = _whole_number("key_value_group_size", key_value_group_size, 1)
        validate_swiftkv_fields(self.num_hidden_layers, self.num_key_value_layers, self.key_value_group_size)

    @property
    def num_swiftkv_groups(self) -> int:
        """How many AcrossKV groups (KV cache entries) the SwiftKV layers `l..L-1` have."""
        return (self.num_hidden_layers - self.num_key_value_layers) // self.key_value_group_size

    @property
    def num_kv_cache_layers(self) -> int:
        """KV cache entries in SwiftKV mode: one per ordinary layer, one per AcrossKV group."""
        return self.num_key_value_layers + self.num_swiftkv_groups

    def is_swiftkv_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.num_key_value_layers

    def kv_cache_index(self, layer_idx: int) -> int:
        """Cache entry of `layer_idx` in SwiftKV mode (layers of one AcrossKV group share an entry)."""
        if not self.is_swiftkv_layer(layer_idx):
            return layer_idx
        return self.num_key_value_layers + (layer_idx - self.num_key_value_layers) // self.key_value_group_size

    def is_group_leader(self, layer_idx: int) -> bool:
        """Only the first layer of an AcrossKV group owns `k_proj_swiftkv` / `v_proj_swiftkv`."""
        return self.is_swiftkv_layer(layer_idx) and (
            (layer_idx - self.num_key_value_layers) % self.key_value_group_size == 0
        )

    def group_leaders(self) -> list[int]:
        return [i for i in range(self.num_key_value_layers, self.num_hidden_layers) if self.is_group_leader(i)]


class LlamaSwiftKVConfig(SwiftKVConfigMixin, LlamaConfig):
    """`llama_swiftkv`: Llama (and Llama-compatible Mistral) with SwiftKV fields."""

    model_type = "llama_swiftkv"

    def __init__(self, swiftkv: bool = False, num_key_value_layers: int | None = None,
                 key_value_group_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_swiftkv(swiftkv, num_key_value_layers, key_value_group_size)


class Qwen2SwiftKVConfig(SwiftKVConfigMixin, Qwen2Config):
    """`qwen2_swiftkv`: Qwen2 (q/k/v biases included) with SwiftKV fields."""

    model_type = "qwen2_swiftkv"

    def __init__(self, swiftkv: bool = False, num_key_value_layers: int | None = None,
                 key_value_group_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_swiftkv(swiftkv, num_key_value_layers, key_value_group_size)


SWIFTKV_CONFIG_CLASSES = {"llama": LlamaSwiftKVConfig, "mistral": LlamaSwiftKVConfig, "qwen2": Qwen2SwiftKVConfig}


__all__ = [
    "LlamaSwiftKVConfig",
    "Qwen2SwiftKVConfig",
    "SwiftKVConfigError",
    "SWIFTKV_CONFIG_CLASSES",
    "resolve_num_key_value_layers",
    "valid_num_key_value_layers",
    "validate_swiftkv_fields",
]
