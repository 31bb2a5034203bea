"""`qwen2_swiftkv`: Qwen2 (q/k/v biases, optional sliding window) written as its SwiftKV difference."""

from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen2RMSNorm,
)

from swiftkv.config import Qwen2SwiftKVConfig
from swiftkv.models.swiftkv import SwiftKVAttentionMixin, SwiftKVForCausalLMMixin, SwiftKVModelMixin


class Qwen2SwiftKVAttention(SwiftKVAttentionMixin, Qwen2Attention):
    pass


class Qwen2SwiftKVDecoderLayer(Qwen2DecoderLayer):
    def __init__(self, config: Qwen2SwiftKVConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = Qwen2SwiftKVAttention(config, layer_idx)


class Qwen2SwiftKVModel(SwiftKVModelMixin, Qwen2Model):
    config_class = Qwen2SwiftKVConfig
    decoder_layer_class = Qwen2SwiftKVDecoderLayer
    norm_class = Qwen2RMSNorm


class Qwen2SwiftKVForCausalLM(SwiftKVForCausalLMMixin, Qwen2ForCausalLM):
    config_class = Qwen2SwiftKVConfig

    def __init__(self, config: Qwen2SwiftKVConfig):
        super().__init__(config)
        self.model = Qwen2SwiftKVModel(config)
        self.post_init()
