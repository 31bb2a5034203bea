"""SwiftKV model classes, registered with transformers' Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from swiftkv.config import LlamaSwiftKVConfig, Qwen2SwiftKVConfig
from swiftkv.models.llama import LlamaSwiftKVForCausalLM, LlamaSwiftKVModel
from swiftkv.models.qwen2 import Qwen2SwiftKVForCausalLM, Qwen2SwiftKVModel

for _config, _model, _causal_lm in (
    (LlamaSwiftKVConfig, LlamaSwiftKVModel, LlamaSwiftKVForCausalLM),
    (Qwen2SwiftKVConfig, Qwen2SwiftKVModel, Qwen2SwiftKVForCausalLM),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _causal_lm, exist_ok=True)

SWIFTKV_MODEL_CLASSES = {
    "llama_swiftkv": LlamaSwiftKVForCausalLM,
    "qwen2_swiftkv": Qwen2SwiftKVForCausalLM,
}

__all__ = [
    "LlamaSwiftKVForCausalLM",
    "LlamaSwiftKVModel",
    "Qwen2SwiftKVForCausalLM",
    "Qwen2SwiftKVModel",
    "SWIFTKV_MODEL_CLASSES",
]
