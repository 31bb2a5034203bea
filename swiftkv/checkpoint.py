"""SwiftKV checkpoints on disk: Snowflake's `*_swiftkv` format (config.json + safetensors shards).

Loading validates before `from_pretrained` so a broken checkpoint fails with a message that names the
file, the weight or the field, instead of silently re-initializing missing weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

import swiftkv.models  # noqa: F401  (registers the *_swiftkv classes)
from swiftkv.config import SwiftKVConfigError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file or weight at fault."""


def output_folder(path: str | Path) -> Path:
    """`path` as a folder to write into: checked before any work, so a mistyped `--out` costs nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file; give a folder (it is created if missing)")
    return path


def is_swiftkv_checkpoint(path: str | Path) -> bool:
    try:
        return str(_read_config_json(Path(path)).get("model_type", "")).endswith("_swiftkv")
    except CheckpointError:
        return False


def _read_config_json(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file} is not valid JSON: {error}") from error


def read_checkpoint_config(path: str | Path) -> PretrainedConfig:
    """The checkpoint's config, with SwiftKV fields validated (`(L - l) % g == 0` etc.)."""
    path = Path(path)
    _read_config_json(path)
    try:
        return AutoConfig.from_pretrained(path)
    except SwiftKVConfigError as error:
        raise CheckpointError(f"{path / 'config.json'}: {error}") from error
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{path / 'config.json'} cannot be read as a model config: {error}") from error


def safetensors_files(path: Path) -> list[Path]:
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{index} is not a valid safetensors index: {error}") from error
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / SAFETENSORS_SINGLE).is_file():
        return [path / SAFETENSORS_SINGLE]
    raise CheckpointError(f"{path} has neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX}")


def checkpoint_tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Weight name -> shape, read from the safetensors headers only (no tensor data is loaded)."""
    shapes = {}
    for file in safetensors_files(Path(path)):
        if not file.is_file():
            raise CheckpointError(f"shard {file} listed in the index is missing")
        try:
            with safe_open(file, framework="pt") as shard:
                for name in shard.keys():
                    shapes[name] = tuple(shard.get_slice(name).get_shape())
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file} is not a readable safetensors file: {error}") from error
    return shapes


def expected_tensor_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Weight name -> shape a model of `config` needs (tied `lm_head` excluded), built on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def validate_checkpoint(path: str | Path) -> PretrainedConfig:
    """Raise `CheckpointError` naming every missing, unexpected or wrongly shaped weight; return the config."""
    path = Path(path)
    config = read_checkpoint_config(path)
    expected = expected_tensor_shapes(config)
    found = checkpoint_tensor_shapes(path)
    problems = []
    missing = sorted(set(expected) - set(found))
    if missing:
        problems.append(f"missing weights: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    unexpected = sorted(set(found) - set(expected) - {"lm_head.weight"})
    if unexpected:
        problems.append(f"unexpected weights: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    for name in sorted(set(expected) & set(found)):
        if expected[name] != found[name]:
            problems.append(f"{name} has shape {list(found[name])}, config.json implies {list(expected[name])}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match its config.json: " + "; ".join(problems))
    return config


def save_checkpoint(model: PreTrainedModel, out_dir: str | Path, tokenizer=None,
                    max_shard_size: str = "2GB") -> Path:
    """Write config.json + safetensors shards (+ tokenizer) in the format vLLM and transformers read."""
    from swiftkv.engine.quantized import RowSlice, WeightOnlyLinear

    if any(isinstance(module, (RowSlice, WeightOnlyLinear)) for module in model.modules()):
        raise CheckpointError("this model was prepared for the engine (fused or quantized projections, whose "
                              "weight names differ from the checkpoint's): save it before building an engine")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
