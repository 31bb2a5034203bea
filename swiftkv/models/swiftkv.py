"""The SwiftKV difference from a Llama-style decoder, written once for every family.

Paper (arXiv 2410.03960), with L layers and `l = num_key_value_layers`:
  * layers `0..l-1` run as in the base model;
  * SingleInputKV: `x = norm_swiftkv(h_l)` (h_l = output of layer l-1); every AcrossKV group leader `j >= l`
    projects keys/values from `x` with `k_proj_swiftkv` / `v_proj_swiftkv`, RoPE applied as usual;
  * layers `j >= l` compute queries with `q_proj_swiftkv` on their own normalized input and attend to the
    keys/values of their group;
  * so when only the last position's output is needed (prefill for generation), layers `l..L-1` run for
    that one position: this is the prefill compute SwiftKV saves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half
from transformers.utils.generic import check_model_inputs

KeyValue = tuple[torch.Tensor, torch.Tensor]


def apply_rotary_to_states(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE for one tensor `[batch, heads, seq, head_dim]` (cos/sin `[batch, seq, head_dim]`)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (states * cos) + (rotate_half(states) * sin)


class SwiftKVAttentionMixin:
    """Adds the `*_proj_swiftkv` projections to a SwiftKV layer's attention and the path that uses them.

    Mixed in before the family's attention class (e.g. `LlamaAttention`), whose `q_proj`/`k_proj`/`v_proj`
    stay: with `config.swiftkv = False` the layer is exactly the base layer.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        if not config.is_swiftkv_layer(layer_idx):
            return
        has_bias = self.q_proj.bias is not None
        self.q_proj_swiftkv = nn.Linear(config.hidden_size, self.q_proj.out_features, bias=has_bias)
        if config.is_group_leader(layer_idx):
            self.k_proj_swiftkv = nn.Linear(config.hidden_size, self.k_proj.out_features, bias=has_bias)
            self.v_proj_swiftkv = nn.Linear(config.hidden_size, self.v_proj.out_features, bias=has_bias)

    def single_input_key_value(self, single_input: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> KeyValue:
        """Keys/values `[batch, kv_heads, seq, head_dim]` of this group from the normalized single input."""
        hidden_shape = (*single_input.shape[:-1], -1, self.head_dim)
        key_states = self.k_proj_swiftkv(single_input).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj_swiftkv(single_input).view(hidden_shape).transpose(1, 2)
        return apply_rotary_to_states(key_states, cos, sin), value_states

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        past_key_values: Optional[Cache] = None,
        cache_position: Optional[torch.LongTensor] = None,
        swiftkv_key_value: Optional[KeyValue] = None,
        **kwargs,
    ):
        if swiftkv_key_value is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values,
                                   cache_position, **kwargs)
        input_shape = hidden_states.shape[:-1]
        query_states = self.q_proj_swiftkv(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        query_states = apply_rotary_to_states(query_states, *position_embeddings)
        key_states, value_states = swiftkv_key_value

        attention_interface: Callable = eager_attention_forward
        if self.config._attn_implementation != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        if getattr(self, "sliding_window", None) is not None:
            kwargs["sliding_window"] = self.sliding_window
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


def _last_position(tensor: Optional[torch.Tensor], seq_dim: int) -> Optional[torch.Tensor]:
    if tensor is None or tensor.shape[seq_dim] == 1:
        return tensor
    return tensor.narrow(seq_dim, tensor.shape[seq_dim] - 1, 1)


class SwiftKVModelMixin:
    """A decoder stack (e.g. `LlamaModel`) with `norm_swiftkv` and the SingleInputKV / AcrossKV forward.

    Subclasses set `decoder_layer_class` and `norm_class`; the family's own `__init__` builds the stack,
    then the SwiftKV layers replace it so `q_proj_swiftkv` etc. exist under the reference weight names.
    """

    decoder_layer_class: type[nn.Module]
    norm_class: type[nn.Module]

    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.ModuleList(
            [self.decoder_layer_class(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        if config.num_key_value_layers < config.num_hidden_layers:
            self.norm_swiftkv = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def _causal_masks(self, mask_kwargs: dict) -> dict:
        """One mask per attention type in use, as the family's own forward builds them."""
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if any(getattr(layer, "attention_type", "full_attention") == "sliding_attention" for layer in self.layers):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        return masks

    def single_input_key_values(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        past_key_values: Optional[Cache],
        cache_position: torch.LongTensor,
    ) -> dict[int, KeyValue]:
        """SingleInputKV + AcrossKV: the K/V (past included) of every group, keyed by its cache index.

        `hidden_states` `[batch, seq, hidden]` is the output of layer `l-1`; each group's K/V is written to
        the cache entry `config.kv_cache_index(leader)`, so the cache holds one entry per group.
        """
        config = self.config
        single_input = self.norm_swiftkv(hidden_states)
        cos, sin = position_embeddings
        key_values = {}
        for leader in config.group_leaders():
            key_states, value_states = self.layers[leader].self_attn.single_input_key_value(single_input, cos, sin)
            cache_index = config.kv_cache_index(leader)
            if past_key_values is not None:
                cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
                key_states, value_states = past_key_values.update(key_states, value_states, cache_index, cache_kwargs)
            key_values[cache_index] = (key_states, value_states)
        return key_values

    def prepare_layer_inputs(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        cache_position: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        **kwargs,
    ) -> "LayerInputs":
        """Masks, positions and RoPE tables shared by every layer, as the family's own forward builds them."""
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if cache_position is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            cache_position = torch.arange(
                past_seen_tokens, past_seen_tokens + inputs_embeds.shape[1], device=inputs_embeds.device
            )
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)
        causal_masks = attention_mask if isinstance(attention_mask, dict) else self._causal_masks({
            "config": self.config,
            "input_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "cache_position": cache_position,
            "past_key_values": past_key_values,
            "position_ids": position_ids,
        })
        return LayerInputs(causal_masks, position_ids, self.rotary_emb(inputs_embeds, position_ids),
                           past_key_values, cache_position, use_cache, kwargs)

    def run_layers(self, hidden_states: torch.Tensor, layer_indices: range, inputs: "LayerInputs",
                   key_values: Optional[dict[int, KeyValue]] = None,
                   layers: Optional[nn.ModuleList] = None) -> torch.Tensor:
        """Run `layer_indices` in order; with `key_values` (SwiftKV) each attends to its group's K/V. `layers`
        (e.g. frozen copies) stand in for `self.layers[layer_indices]`, one per index."""
        for position, layer_idx in enumerate(layer_indices):
            layer = self.layers[layer_idx] if layers is None else layers[position]
            if key_values is not None:
                inputs.extra["swiftkv_key_value"] = key_values[self.config.kv_cache_index(layer_idx)]
            hidden_states = layer(
                hidden_states,
                attention_mask=inputs.causal_masks[getattr(layer, "attention_type", "full_attention")],
                position_ids=inputs.position_ids,
                past_key_values=inputs.past_key_values,
                use_cache=inputs.use_cache,
                cache_position=inputs.cache_position,
                position_embeddings=inputs.position_embeddings,
                **inputs.extra,
            )
        inputs.extra.pop("swiftkv_key_value", None)
        return hidden_states

    def swiftkv_layers(self, hidden_states: torch.Tensor, inputs: "LayerInputs",
                       last_token_only: bool = False) -> torch.Tensor:
        """Layers `l..L-1` in SwiftKV mode on the output of layer `l-1` `[batch, seq, hidden]`.

        K/V of every position come from SingleInputKV; with `last_token_only` the layers themselves run
        for the last position only (the skipped prefill) and the result is `[batch, 1, hidden]`.
        """
        key_values = self.single_input_key_values(hidden_states, inputs.position_embeddings,
                                                  inputs.past_key_values, inputs.cache_position)
        if last_token_only:
            hidden_states, inputs = _last_position(hidden_states, 1), inputs.last_position()
        return self.run_layers(hidden_states, range(self.config.num_key_value_layers, self.config.num_hidden_layers),
                               inputs, key_values)

    @check_model_inputs
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        cache_position: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        last_token_only: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Base forward when `config.swiftkv` is False; SwiftKV forward otherwise.

        `last_token_only=True` (set by the causal LM when only the last logits are wanted) runs layers
        `l..L-1` for the last position only: the SwiftKV prefill. Their K/V still cover every position.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        inputs = self.prepare_layer_inputs(inputs_embeds, attention_mask, position_ids, past_key_values,
                                           cache_position, use_cache, **kwargs)
        config = self.config
        swiftkv = config.swiftkv and config.num_key_value_layers < config.num_hidden_layers
        num_full_layers = config.num_key_value_layers if swiftkv else config.num_hidden_layers
        hidden_states = self.run_layers(inputs_embeds, range(num_full_layers), inputs)
        if swiftkv:
            hidden_states = self.swiftkv_layers(hidden_states, inputs, last_token_only)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=inputs.past_key_values)


@dataclass
class LayerInputs:
    """What every decoder layer of one forward shares besides the hidden states."""

    causal_masks: dict
    position_ids: torch.LongTensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    past_key_values: Optional[Cache]
    cache_position: torch.LongTensor
    use_cache: Optional[bool]
    extra: dict = field(default_factory=dict)

    def last_position(self) -> "LayerInputs":
        """The same inputs for the last query position only (keys still cover every position)."""
        return LayerInputs(
            {name: _last_position(mask, 2) for name, mask in self.causal_masks.items()},
            _last_position(self.position_ids, 1),
            tuple(_last_position(t, 1) for t in self.position_embeddings),
            self.past_key_values,
            _last_position(self.cache_position, 0),
            self.use_cache,
            self.extra,
        )


class SwiftKVForCausalLMMixin:
    """Causal LM head over a SwiftKV stack: asks for the SwiftKV prefill when only the last logits are kept.

    `generate` passes `logits_to_keep=1`, so HF generation gets the skipped prefill with no other change.
    """

    def forward(self, *args, labels=None, logits_to_keep=0, **kwargs):
        kwargs["last_token_only"] = bool(
            self.config.swiftkv
            and isinstance(logits_to_keep, int)
            and logits_to_keep == 1
            and labels is None
            and not kwargs.get("output_hidden_states")
            and not kwargs.get("output_attentions")
        )
        return super().forward(*args, labels=labels, logits_to_keep=logits_to_keep, **kwargs)

    def swiftkv_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters SwiftKV adds (the only ones distillation trains)."""
        return [(name, p) for name, p in self.named_parameters() if "swiftkv" in name]


class swiftkv_mode:
    """Context manager running a SwiftKV checkpoint with `swiftkv` on or off (off = its own base model).

    One set of weights then serves as teacher (off) and student (on), as in the released checkpoints.
    """

    def __init__(self, model: nn.Module, enabled: bool):
        self.config = model.config
        self.enabled = enabled

    def __enter__(self):
        self.previous = self.config.swiftkv
        self.config.swiftkv = self.enabled
        return self

    def __exit__(self, *exc_info):
        self.config.swiftkv = self.previous
