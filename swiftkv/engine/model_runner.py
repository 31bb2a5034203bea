"""Forward passes over a paged KV cache for base and SwiftKV checkpoints (Llama / Qwen2 families).

The runner reuses the checkpoint's own modules (norms, projections, MLPs, rotary embedding) and owns
only what is new: where K/V live and which tokens run which layers.

Cache layout: `k_cache` / `v_cache` are `[kv_entries, kv_heads, num_slots, head_dim]`, a slot being
`block * block_size + offset`; head-major, so gathering a sequence's slots (`index_select`) gives each head's
keys contiguous, ready for attention without another copy. A base model has one entry per layer; SwiftKV
has one per layer `< l` and one per AcrossKV group (consecutive, so SingleInputKV writes them in one op).

Prefill of a prompt chunk `[start, end)`:
  * layers `< l` run on every chunk token and write their K/V;
  * SwiftKV: `norm_swiftkv` of layer `l-1`'s output gives every group's K/V for the chunk (SingleInputKV);
  * layers `>= l` run only for the prompt's last token, and only in the chunk that holds it.
Decode runs every layer for one new token per sequence, as a batch, through its own lean path: the
projections that read the same input are one matrix each (q|k|v, gate|up; `fuse_projections`), RoPE
rotates q and k together, RMSNorm is PyTorch's fused kernel; attention reads one row's contiguous slots in
place through the fused SDPA kernel (up to `IN_PLACE_ATTENTION_MAX_KEYS`), else two small matmuls over the
gathered context. On a CPU a decode step is a few hundred small calls around weight-streaming GEMVs, so
every call saved is time saved (docs/engine-decode.md).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from swiftkv.engine.block_manager import contiguous_start, slot_ids
from swiftkv.engine.quantized import fuse_projections
from swiftkv.engine.sequence import Sequence
from swiftkv.models.swiftkv import apply_rotary_to_states


@contextmanager
def onednn(enabled: bool):
    """Switch oneDNN kernels on/off for a block (only the enabled flag, unlike `torch.backends.mkldnn.flags`,
    which also resets TF32 settings and warns on every call)."""
    previous = torch.backends.mkldnn.set_flags(_enabled=enabled, _fp32_precision=None)[0]
    try:
        yield
    finally:
        torch.backends.mkldnn.set_flags(_enabled=previous, _fp32_precision=None)


@dataclass
class Batch:
    """Tokens to run and where their K/V go / come from.

    input_ids, positions: `[batch, tokens]`; write_slots: `[batch * tokens]` cache slots of those tokens;
    read_slots: `[batch, kv_length]` slots each row attends to; attention_mask: `[batch, 1, tokens, kv_length]`,
    or None when plain causal attention is exact (one row whose keys start at its first query position 0,
    or a single query that sees every key) so the fused kernel runs without a mask.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    write_slots: torch.Tensor
    read_slots: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    wants_logits: bool = True      # False for a prefill chunk that does not end the prompt
    contiguous_start: Optional[int] = None  # one decode row read in place: read_slots are `start, start + 1, ...`


# One decode row reads its contiguous slots in place (fused SDPA) up to this many keys; beyond, gathering them
# for two matmuls is faster on CPU (benchmarks/decode_attention.py: 88 vs 105 us per layer at 1024 keys,
# 214 vs 159 at 2048).
IN_PLACE_ATTENTION_MAX_KEYS = 1024

# Rotary embeddings whose frequencies change with the sequence length: K/V cached at one length would be
# rotated differently from what transformers computes over the whole sequence.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def check_supported(config) -> None:
    """Refuse, naming the field, a model this runner would not compute exactly: it attends over the whole
    context (no sliding window) and rotates each token once (no length-dependent RoPE)."""
    layer_types = getattr(config, "layer_types", None)  # where a config has them, they say which layers slide
    window = getattr(config, "sliding_window", None)
    if ("sliding_attention" in layer_types) if layer_types else window is not None:
        raise ValueError(f"sliding_window={window}: the engine attends over the whole context, so a "
                         "sliding-window model would silently diverge; run it in transformers")
    rope = getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type in LENGTH_DEPENDENT_ROPE:
        raise ValueError(f"rope_scaling.rope_type={rope_type!r} changes with the sequence length, which the "
                         f"engine's cached keys cannot follow; supported: any other rope_type")


class ModelRunner:
    """`kv_cache_dtype="int8"` stores K/V as int8 with one scale per token and head (absmax / 127),
    about half the bytes of bf16: the other half of the paper's KV-memory reduction."""

    def __init__(self, model, kv_cache_bytes: int, block_size: int, kv_cache_dtype: str = "auto"):
        check_supported(model.config)
        self.model = fuse_projections(model).eval()
        self.decoder = model.model
        config = self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.num_layers = config.num_hidden_layers
        self.swiftkv = bool(getattr(config, "swiftkv", False)) and config.num_key_value_layers < self.num_layers
        self.num_full_layers = config.num_key_value_layers if self.swiftkv else self.num_layers
        self.kv_entry = [config.kv_cache_index(i) if self.swiftkv else i for i in range(self.num_layers)]
        self.num_kv_entries = config.num_kv_cache_layers if self.swiftkv else self.num_layers
        attention = self.decoder.layers[0].self_attn
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.block_size = block_size
        if kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'int8', got {kv_cache_dtype!r}")
        self.quantized = kv_cache_dtype == "int8"
        storage = torch.int8 if self.quantized else self.dtype
        bytes_per_head = self.head_dim * storage.itemsize + (self.dtype.itemsize if self.quantized else 0)
        bytes_per_block = 2 * self.num_kv_entries * block_size * self.num_kv_heads * bytes_per_head
        self.num_blocks = int(kv_cache_bytes // bytes_per_block)
        shape = (self.num_kv_entries, self.num_kv_heads, max(self.num_blocks, 1) * block_size, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=storage, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=storage, device=self.device)
        if self.quantized:
            self.k_scale = torch.zeros(*shape[:-1], 1, dtype=self.dtype, device=self.device)
            self.v_scale = torch.zeros(*shape[:-1], 1, dtype=self.dtype, device=self.device)
        self.group_leaders = config.group_leaders() if self.swiftkv else []
        if self.swiftkv:
            self.single_input_kv = self._stacked_single_input_kv()

    def _stacked_single_input_kv(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight, bias) of every group's `k_proj_swiftkv` then `v_proj_swiftkv`, stacked (a small copy)."""
        projections = [projection for leader in self.group_leaders
                       for projection in (self.decoder.layers[leader].self_attn.k_proj_swiftkv,
                                          self.decoder.layers[leader].self_attn.v_proj_swiftkv)]
        weight = torch.cat([p.weight.detach() for p in projections])
        has_bias = projections[0].bias is not None
        return weight, torch.cat([p.bias.detach() for p in projections]) if has_bias else None

    def _project(self, linear, states: torch.Tensor, heads: int) -> torch.Tensor:
        return linear(states).view(*states.shape[:-1], heads, self.head_dim)

    def _attend(self, query: torch.Tensor, entry: int, batch: Batch, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """query `[b, n, heads, d]` over the cache slots of each row -> `[b, n, heads * d]`."""
        if batch.contiguous_start is not None:
            return self._attend_in_place(query, entry, batch.contiguous_start, batch.read_slots.shape[1])
        keys = self._read(self.k_cache, "k_scale", entry, batch.read_slots)  # [kv_heads, b, T, d]
        values = self._read(self.v_cache, "v_scale", entry, batch.read_slots)
        if query.shape[1] == 1:
            with onednn(enabled=True):
                return self._attend_one_query(query, keys, values, mask)
        keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # [b, kv_heads, T, d]
        causal = mask is None
        output = F.scaled_dot_product_attention(query.transpose(1, 2), keys, values, attn_mask=mask,
                                                is_causal=causal, scale=self.scaling, enable_gqa=True)
        return output.transpose(1, 2).reshape(*query.shape[:2], -1)

    def _attend_in_place(self, query: torch.Tensor, entry: int, start: int, length: int) -> torch.Tensor:
        """One decode row whose context is the contiguous slots `[start, start + length)`: the fused SDPA
        kernel reads K/V straight from the cache (no gather), with the KV heads as its batch."""
        heads, head_dim = query.shape[2], self.head_dim
        grouped = query.reshape(self.num_kv_heads, 1, heads // self.num_kv_heads, head_dim)
        keys = self.k_cache[entry, :, start:start + length].unsqueeze(1)  # [kv_heads, 1, T, d], a view
        values = self.v_cache[entry, :, start:start + length].unsqueeze(1)
        output = F.scaled_dot_product_attention(grouped, keys, values, scale=self.scaling)
        return output.reshape(1, 1, heads * head_dim)

    def _attend_one_query(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Decode attention as two small matmuls over the query heads that share a KV head, for a batch of
        rows (padded, masked) or a row whose slots are scattered. keys/values: `[kv_heads, b, T, d]`, so both
        matmuls run over contiguous (head, row) batches (`benchmarks/decode_attention.py` compares the
        kernels)."""
        rows, _, heads, head_dim = query.shape
        grouped = query.reshape(rows, self.num_kv_heads, heads // self.num_kv_heads, head_dim).transpose(0, 1)
        scores = torch.matmul(grouped, keys.transpose(-1, -2)) * self.scaling  # [kv_heads, b, group, T]
        if mask is not None:
            scores = scores.masked_fill(~mask.reshape(1, rows, 1, -1), float("-inf"))
        probabilities = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        output = torch.matmul(probabilities, values)  # [kv_heads, b, group, d]
        return output.transpose(0, 1).reshape(rows, 1, heads * head_dim)

    def _read(self, cache: torch.Tensor, scale_name: str, entry: int, slots: torch.Tensor) -> torch.Tensor:
        """K or V of `slots` `[b, T]` -> `[kv_heads, b, T, d]` (padding slots read whatever is there)."""
        flat = slots.reshape(-1)
        states = cache[entry].index_select(1, flat)
        if self.quantized:
            states = states.to(self.dtype) * getattr(self, scale_name)[entry].index_select(1, flat)
        return states.view(self.num_kv_heads, *slots.shape, self.head_dim)

    def _write(self, entries: slice, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """K/V `[b, n, len(entries), kv_heads, d]` of the tokens at `slots` `[b * n]` into cache `entries`."""
        for cache, scale_name, states in ((self.k_cache, "k_scale", keys), (self.v_cache, "v_scale", values)):
            states = states.flatten(0, 1).permute(1, 2, 0, 3)  # [entries, kv_heads, b * n, d]
            if self.quantized:
                scale = states.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
                getattr(self, scale_name)[entries].index_copy_(2, slots, scale.to(self.dtype))
                states = (states / scale).round().clamp(-127, 127).to(torch.int8)
            cache[entries].index_copy_(2, slots, states)

    def _layer(self, index: int, hidden: torch.Tensor, rope: tuple, batch: Batch, mask: Optional[torch.Tensor],
               write_slots: Optional[torch.Tensor]) -> torch.Tensor:
        """One decoder layer. `write_slots=None`: a SwiftKV layer, whose K/V the single input already wrote."""
        layer = self.decoder.layers[index]
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        if write_slots is None:
            query = self._project(attention.q_proj_swiftkv, normed, self.num_heads)
        else:
            projected = self._project(attention.qkv_proj, normed, self.num_heads + 2 * self.num_kv_heads)
            query, keys, values = projected.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
            keys = apply_rotary_to_states(keys.transpose(1, 2), *rope)
            entry = self.kv_entry[index]
            self._write(slice(entry, entry + 1), write_slots, keys.transpose(1, 2).unsqueeze(2), values.unsqueeze(2))
        query = apply_rotary_to_states(query.transpose(1, 2), *rope)
        hidden = hidden + attention.o_proj(self._attend(query.transpose(1, 2), self.kv_entry[index], batch, mask))
        return hidden + self._mlp(layer, layer.post_attention_layernorm(hidden))

    @staticmethod
    def _mlp(layer, normed: torch.Tensor) -> torch.Tensor:
        gate, up = layer.mlp.gate_up_proj(normed).chunk(2, dim=-1)
        return layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    def _write_single_input_kv(self, hidden: torch.Tensor, rope: tuple, write_slots: torch.Tensor) -> None:
        """SingleInputKV + AcrossKV: K/V of every group from `norm_swiftkv(hidden)` (layer l-1's output), as one
        matmul over the groups' stacked projections, written to the groups' consecutive cache entries."""
        rows, tokens = hidden.shape[:2]
        groups = len(self.group_leaders)
        projected = F.linear(self.decoder.norm_swiftkv(hidden), *self.single_input_kv)
        projected = projected.view(rows, tokens, groups, 2, self.num_kv_heads, self.head_dim)
        keys = projected[:, :, :, 0].reshape(rows, tokens, groups * self.num_kv_heads, self.head_dim)
        keys = apply_rotary_to_states(keys.transpose(1, 2), *rope).transpose(1, 2)
        first = self.kv_entry[self.group_leaders[0]]
        self._write(slice(first, first + groups), write_slots,
                    keys.view(rows, tokens, groups, self.num_kv_heads, self.head_dim), projected[:, :, :, 1])

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _slots(self, sequence: Sequence, start: int, end: int) -> torch.Tensor:
        return slot_ids(sequence.block_table, self.block_size, start, end).to(self.device)

    def prefill(self, sequence: Sequence, start: int, end: int) -> Optional[torch.Tensor]:
        """Run prompt tokens `[start, end)` of `sequence` (its blocks reserved); the logits `[1, vocab]` of the
        prompt's last token when this chunk ends the prompt, else None."""
        positions = torch.arange(start, end, device=self.device)
        keys = torch.arange(end, device=self.device)
        return self.forward(Batch(
            input_ids=self._tensor(sequence.token_ids[start:end])[None],
            positions=positions[None],
            write_slots=self._slots(sequence, start, end),
            read_slots=self._slots(sequence, 0, end)[None],
            attention_mask=None if start == 0 else (keys[None, :] <= positions[:, None])[None, None],
            wants_logits=end == len(sequence),
        ))

    def decode(self, sequences: list[Sequence]) -> torch.Tensor:
        """Logits `[b, vocab]` of one new token for each sequence (its last token run through every layer)."""
        lengths = [len(s) for s in sequences]
        read = torch.nn.utils.rnn.pad_sequence([self._slots(s, 0, len(s)) for s in sequences], batch_first=True)
        single = len(sequences) == 1
        in_place = single and not self.quantized and lengths[0] <= IN_PLACE_ATTENTION_MAX_KEYS
        return self.forward(Batch(
            input_ids=self._tensor([[s.token_ids[-1]] for s in sequences]),
            positions=self._tensor([[n - 1] for n in lengths]),
            write_slots=read[torch.arange(len(sequences)), torch.tensor(lengths) - 1],
            read_slots=read,
            attention_mask=None if single else
            (torch.arange(read.shape[1], device=self.device)[None, :] < self._tensor(lengths)[:, None])[:, None, None],
            contiguous_start=contiguous_start(sequences[0].block_table, self.block_size, lengths[0]) if in_place
            else None,
        ))

    @staticmethod
    def _norm(norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The checkpoint's RMSNorm (float32 statistics, scaled in the model's dtype) as one fused kernel."""
        normed = F.rms_norm(hidden.float(), norm.weight.shape, eps=norm.variance_epsilon)
        return norm.weight * normed.to(hidden.dtype)

    def _decode_layer(self, index: int, hidden: torch.Tensor, rope: tuple, batch: Batch) -> torch.Tensor:
        """One layer for one token per row, `hidden` `[b, hidden]`. Layers `< l` write their K/V; a SwiftKV
        layer only reads its group's, which SingleInputKV wrote."""
        layer = self.decoder.layers[index]
        attention = layer.self_attn
        rows, heads, kv_heads = hidden.shape[0], self.num_heads, self.num_kv_heads
        writes = index < self.num_full_layers
        normed = self._norm(layer.input_layernorm, hidden)
        projected = (attention.qkv_proj if writes else attention.q_proj_swiftkv)(normed)
        projected = projected.view(rows, -1, self.head_dim)
        rotated = _rope(projected[:, :heads + kv_heads] if writes else projected, *rope)  # q and k at once
        entry = self.kv_entry[index]
        if writes:
            self._write(slice(entry, entry + 1), batch.write_slots, rotated[:, None, None, heads:],
                        projected[:, None, None, heads + kv_heads:])
        attended = self._attend(rotated[:, None, :heads], entry, batch, batch.attention_mask)
        hidden = hidden + attention.o_proj(attended[:, 0])
        return hidden + self._mlp(layer, self._norm(layer.post_attention_layernorm, hidden))

    def _decode(self, batch: Batch) -> torch.Tensor:
        """Logits `[b, vocab]` of one new token per row."""
        hidden = self.decoder.embed_tokens(batch.input_ids[:, 0])
        cos, sin = self.decoder.rotary_emb(hidden, batch.positions)
        rope = (cos[:, 0, None], _signed_sin(sin[:, 0, None]))  # [b, 1, d], broadcast over heads
        for index in range(self.num_full_layers):
            hidden = self._decode_layer(index, hidden, rope, batch)
        if self.swiftkv:
            self._write_single_input_kv(hidden[:, None], (cos, sin), batch.write_slots)
            for index in range(self.num_full_layers, self.num_layers):
                hidden = self._decode_layer(index, hidden, rope, batch)
        return self.model.lm_head(self._norm(self.decoder.norm, hidden)).float()

    @torch.inference_mode()
    def forward(self, batch: Batch) -> Optional[torch.Tensor]:
        """Logits `[batch, vocab]` of each row's last token, or None for a prefill chunk mid-prompt.

        One token of one sequence is a chain of matrix-vector products that only stream weights; oneDNN's
        bf16 GEMV reads them at well under half the memory bandwidth that ATen's own GEMV reaches on CPU
        (benchmarks/roofline.py), so that case runs with oneDNN off.
        """
        single_token = batch.input_ids.numel() == 1 and self.device.type == "cpu"
        with onednn(enabled=not single_token):
            return self._decode(batch) if batch.input_ids.shape[1] == 1 and batch.wants_logits \
                else self._forward(batch)

    def _forward(self, batch: Batch) -> Optional[torch.Tensor]:
        hidden = self.decoder.embed_tokens(batch.input_ids)
        rope = self.decoder.rotary_emb(hidden, batch.positions)
        for index in range(self.num_full_layers):
            hidden = self._layer(index, hidden, rope, batch, batch.attention_mask, batch.write_slots)
        if self.swiftkv:
            self._write_single_input_kv(hidden, rope, batch.write_slots)
            if not batch.wants_logits:
                return None  # the SwiftKV saving: mid-prompt chunks never touch layers >= l
            hidden = hidden[:, -1:]
            rope = tuple(t[:, -1:] for t in rope)
            mask = None if batch.attention_mask is None else batch.attention_mask[:, :, -1:]
            for index in range(self.num_full_layers, self.num_layers):
                hidden = self._layer(index, hidden, rope, batch, mask, None)
        elif not batch.wants_logits:
            return None
        return self.model.lm_head(self.decoder.norm(hidden[:, -1])).float()


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: `rotate_half(x) * sin == roll(x, d/2) * signed_sin`, bit for bit."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def _rope(states: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the checkpoint computes it (`x * cos + rotate_half(x) * sin`), with one roll for the rotation."""
    return states * cos + torch.roll(states, states.shape[-1] // 2, dims=-1) * signed_sin
