"""`llama_swiftkv`: Llama written as its SwiftKV difference (Snowflake's `LlamaSwiftKVForCausalLM` format)."""

from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaRMSNorm,
)

from swiftkv.config import LlamaSwiftKVConfig
from swiftkv.models.swiftkv import SwiftKVAttentionMixin, SwiftKVForCausalLMMixin, SwiftKVModelMixin


class LlamaSwiftKVAttention(SwiftKVAttentionMixin, LlamaAttention):
    pass


class LlamaSwiftKVDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: LlamaSwiftKVConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = LlamaSwiftKVAttention(config, layer_idx)


class LlamaSwiftKVModel(SwiftKVModelMixin, LlamaModel):
    config_class = LlamaSwiftKVConfig
    decoder_layer_class = LlamaSwiftKVDecoderLayer
    norm_class = LlamaRMSNorm


class LlamaSwiftKVForCausalLM(SwiftKVForCausalLMMixin, LlamaForCausalLM):
    config_class = LlamaSwiftKVConfig

    def __init__(self, config: LlamaSwiftKVConfig):
        super().__init__(config)
        self.model = LlamaSwiftKVModel(config)
        self.post_init()
