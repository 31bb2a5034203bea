"""swiftkv: SwiftKV (arXiv 2410.03960) for Hugging Face decoder models.

Importing the package registers `llama_swiftkv` and `qwen2_swiftkv` with transformers' Auto classes.
"""

from swiftkv.config import LlamaSwiftKVConfig, Qwen2SwiftKVConfig, SwiftKVConfigError
from swiftkv.models import LlamaSwiftKVForCausalLM, Qwen2SwiftKVForCausalLM

__version__ = "0.1.0"

__all__ = [
    "LlamaSwiftKVConfig",
    "LlamaSwiftKVForCausalLM",
    "Qwen2SwiftKVConfig",
    "Qwen2SwiftKVForCausalLM",
    "SwiftKVConfigError",
]
