"""Forward passes over a paged KV cache for base and SwiftKV checkpoints (Llama / Qwen2 families).

The runner reuses the checkpoint's own modules (norms, projections, MLPs, rotary embedding) and owns
only what is new: where K/V live and which tokens run which layers.

Cache layout: `k_cache` / `v_cache` are `[kv_entries, kv_heads, num_slots, head_dim]`, a slot being
`block * block_size + offset`; head-major, so a sequence whose slots are one range is, for each head, one
contiguous `[tokens, head_dim]` matrix that attention reads in place (on a CPU with the bf16 kernels, each
16 slots are stored as the tiles the kernels compute on instead: `paged_attention_cpu.tile_cache`). A base
model has one entry per layer; SwiftKV has one per layer `< l` and one per AcrossKV group (consecutive, so
SingleInputKV writes them in one op).

One forward runs a packed batch: the chunks of a step (the new token of every decoding sequence and the
prompt chunks of several prompts) concatenated into one row of tokens, so every projection and MLP is one
matrix product over all of them, and only attention looks at which tokens belong to which sequence:
  * layers `< l` run on every token and write their K/V;
  * SwiftKV: `norm_swiftkv` of layer `l-1`'s output gives every group's K/V for every token (SingleInputKV);
  * layers `>= l` run only for the tokens whose logits are wanted (decode tokens, a prompt's last token),
    so a prompt chunk's other tokens never touch them.
The projections that read the same input are one matrix each (q|k|v, gate|up; `fuse_projections`), RoPE
rotates q and k together and RMSNorm is PyTorch's fused kernel: on a CPU a decode step is a few hundred small
calls around weight-streaming GEMVs, so every call saved is time saved (docs/engine-decode.md).
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from swiftkv.engine import paged_attention, paged_attention_cpu, small_batch_linear
from swiftkv.engine.block_manager import contiguous_start, slot_ids
from swiftkv.engine.quantized import fuse_projections
from swiftkv.engine.sequence import Chunk

logger = logging.getLogger(__name__)


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
class QueryRows:
    """Tokens that are each a sequence's only query in the batch (decode tokens; in SwiftKV's layers `>= l`,
    every token that gives logits), attending over their own contexts of `lengths` keys.

    With a paged kernel (the GPU's Triton kernel, engine/paged_attention.py; the CPU's C++ kernel,
    engine/paged_attention_cpu.py), block_tables `[rows, blocks]` and key_counts `[rows]` (int32): the kernel
    reads K/V straight from the blocks. Without one (on a CPU, 8-bit caches other than a tiled int8 one; where the
    kernel cannot be built), in_place_starts: each row's first slot when every row's context is one slot range
    read in place (fused SDPA, row by row); else read_slots `[rows, T]` (padded) are gathered for one batched
    attention, with mask `[rows, T]` over the padding (None for one row)."""

    lengths: list[int]
    in_place_starts: Optional[list[int]] = None
    read_slots: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    block_tables: Optional[torch.Tensor] = None
    key_counts: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def count(self) -> int:
        """The number of rows, from the key counts' shape where there are some: in a compiled step that size is
        symbolic, so one graph serves every batch size (len() of the lengths list would be a constant)."""
        return self.key_counts.shape[0] if self.key_counts is not None else len(self.lengths)


@dataclass
class PromptSpan:
    """A prompt chunk of several queries: packed tokens `[first, first + count)` at positions
    `[keys - count, keys)`, attending causally over the sequence's first `keys` tokens. With the CPU prompt
    kernel (engine/paged_attention_cpu.py), read through `block_table` `[blocks]` int32; else read in place from
    `in_place_start` or gathered from `read_slots` `[keys]`, with mask `[count, keys]`, None when the chunk
    starts the prompt (plain causal attention)."""

    first: int
    count: int
    keys: int
    in_place_start: Optional[int] = None
    read_slots: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    block_table: Optional[torch.Tensor] = None


@dataclass
class Batch:
    """One forward's tokens, packed: the single-query tokens first (`rows`), then the prompt spans.

    input_ids, positions, write_slots: `[tokens]`; logit_tokens: which tokens give logits (None: all of them);
    upper_rows: SwiftKV's layers `>= l`, the logit tokens as single queries."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    write_slots: torch.Tensor
    rows: QueryRows
    spans: list[PromptSpan] = field(default_factory=list)
    logit_tokens: Optional[torch.Tensor] = None
    upper_rows: Optional[QueryRows] = None

    @property
    def wants_logits(self) -> bool:
        return self.logit_tokens is None or self.logit_tokens.numel() > 0


# Without a paged kernel (see QueryRows), single-query rows whose slots are one range read K/V in place through
# the fused SDPA kernel, row by row: a lone row always (benchmarks/decode_attention.json: 20.8 against 54.6 us per
# layer gathered at 128 keys; at 2048 the two trade places from run to run), several rows once they hold more
# than this many keys each on average; below, gathering them into one padded batch for two matmuls is faster
# (8 rows of 512 keys: 310 us gathered, 519 row by row; of 1024: 3,070 against 933).
GATHERED_ROWS_MAX_MEAN_KEYS = 512

KV_CACHE_DTYPES = ("auto", "int8", "fp8")  # auto: the model's dtype
SKIP_COMPILED_GUARDS = True  # compiled decode: check only the guards that tell its two start-up graphs apart
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448

# Rotary embeddings whose frequencies change with the sequence length: K/V cached at one length would be
# rotated differently from what transformers computes over the whole sequence.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def encode_kv(states: torch.Tensor, kv_cache_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit codes an int8 or fp8 cache stores for `states` `[..., d]`, and their scale per token and head
    (absmax / the format's largest value), in the states' dtype."""
    top = FP8_MAX if kv_cache_dtype == "fp8" else 127
    scale = states.abs().amax(-1, keepdim=True).clamp(min=1e-8) / top
    if kv_cache_dtype == "fp8":
        return (states / scale).to(torch.float8_e4m3fn).view(torch.uint8), scale
    return (states / scale).round().clamp(-127, 127).to(torch.int8), scale


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
    """`kv_cache_dtype="int8"` stores K/V as int8 with one scale per token and head (absmax / 127), `"fp8"` as
    float8 e4m3 with one scale per token and head (absmax / 448, the format's largest value): about half the
    bytes of bf16, the other half of the paper's KV-memory reduction. fp8 keeps more precision for small
    values (a float's relative step) where int8 keeps a uniform step; both are stored as bytes and converted
    on read, so they run on any device (fp8 is stored as the bytes of e4m3: CPU kernels do not copy float8).
    On a GPU the paged decode kernel reads both as stored (engine/paged_attention.py), so decode steps replay
    from CUDA graphs with any cache. On a CPU where a bf16 cache would be tiled, int8 codes sit in the same
    tiles, quantized as they are written, and both C++ kernels read them (16 streams 412 -> 731 tokens/s
    against PyTorch's attention; benchmarks/README.md).

    The cache holds one block more than the budget's `num_blocks`, block 0, never handed out: the scratch block
    that padding rows of a CUDA-graph decode step write to and read from (engine/cuda_graphs.py). Sequences'
    blocks start at 1, so no sequence's keys start at slot 0, a value torch.compile would specialise on."""

    def __init__(self, model, kv_cache_bytes: int, block_size: int, kv_cache_dtype: str = "auto"):
        check_supported(model.config)
        self.model = fuse_projections(model).eval()
        self.decoder = model.model
        config = self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        if self.device.type == "cpu":  # decode's few-row products: our kernel (bf16 only)
            small_batch_linear.use_small_batch_linear(self.model)
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
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
        self.kv_cache_dtype = kv_cache_dtype
        self.quantized = kv_cache_dtype != "auto"
        storage = {"auto": self.dtype, "int8": torch.int8, "fp8": torch.uint8}[kv_cache_dtype]
        bytes_per_head = self.head_dim * storage.itemsize + (self.dtype.itemsize if self.quantized else 0)
        bytes_per_block = 2 * self.num_kv_entries * block_size * self.num_kv_heads * bytes_per_head
        self.num_blocks = int(kv_cache_bytes // bytes_per_block)
        self.scratch_block, self.first_block = 0, 1
        shape = (self.num_kv_entries, self.num_kv_heads, (self.num_blocks + 1) * block_size, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=storage, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=storage, device=self.device)
        if self.quantized:
            self.k_scale = torch.zeros(*shape[:-1], 1, dtype=self.dtype, device=self.device)
            self.v_scale = torch.zeros(*shape[:-1], 1, dtype=self.dtype, device=self.device)
        self.group_leaders = config.group_leaders() if self.swiftkv else []
        if self.swiftkv:
            self.single_input_kv = self._stacked_single_input_kv()
            fast = self.device.type == "cpu" and small_batch_linear.available() and \
                small_batch_linear.supports(self.single_input_kv[0])
            self.single_input_kv_linear = small_batch_linear.linear if fast else F.linear
        # decode rows through a paged kernel: Triton on a GPU (8-bit caches too, dequantized as it reads them), C++
        # on a CPU (8-bit caches are gathered instead, but for a tiled int8 one, below)
        self.paged_kernel = None
        if self.device.type == "cuda" and paged_attention.available():
            self.paged_kernel = paged_attention.paged_decode_attention
        elif not self.quantized and self.device.type == "cpu" and paged_attention_cpu.available():
            self.paged_kernel = paged_attention_cpu.paged_decode_attention
        # prompt chunks through the CPU's C++ flash-attention kernel where it has its vectorised path (about 4x
        # PyTorch's SDPA on bf16, benchmarks/prompt_attention.py); elsewhere SDPA
        self.prompt_kernel = None
        if self.paged_kernel is paged_attention_cpu.paged_decode_attention and \
                paged_attention_cpu.prefill_attention_is_fast(self.dtype, self.head_dim):
            self.prompt_kernel = paged_attention_cpu.prefill_attention
        # where both kernels have their vectorised paths, K/V are stored as the tiles they compute on
        # (csrc/bf16_tiles.h): decode attention then needs no transposes (benchmarks/decode_attention.py); an int8
        # cache's codes sit in the same tiles (half the bytes per key): decode multiplies them in integers, the
        # prompt kernel dequantizes each tile
        self.tiled_cache = kv_cache_dtype in ("auto", "int8") and self.device.type == "cpu" and \
            paged_attention_cpu.available() and \
            paged_attention_cpu.tiled_cache_is_supported(self.dtype, self.head_dim, block_size)
        if self.tiled_cache:
            self.paged_kernel = functools.partial(paged_attention_cpu.paged_decode_attention, tiled=True)
            self.prompt_kernel = functools.partial(paged_attention_cpu.prefill_attention, tiled=True)
        self.decode_graphs = None
        self.compiled_decode, self.compiled_kv_write, self.compile_seconds = None, None, 0.0
        self.compiled_batches = True  # off after a compiled batch step fails (forward)

    def capture_decode_graphs(self, max_batch: int, max_model_length: int) -> None:
        """Replay decode-only steps of up to `max_batch` sequences from CUDA graphs (engine/cuda_graphs.py)."""
        from swiftkv.engine.cuda_graphs import DecodeGraphs

        if self.device.type != "cuda" or self.paged_kernel is None:
            raise ValueError("CUDA graphs need a CUDA device and Triton")
        max_blocks = max(2, min(self.num_blocks, -(-max_model_length // self.block_size)))  # as block_tables()
        self.decode_graphs = DecodeGraphs(self, max_batch, max_blocks)

    def compile_decode(self) -> None:
        """Run decode-only steps through torch.compile (engine/compiled.py): one stream, and batches where the
        paged kernel reads the cache; compiles now."""
        from swiftkv.engine.compiled import compile_decode

        self.compiled_decode = compile_decode(self)

    def _stacked_single_input_kv(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight, bias) of every group's `k_proj_swiftkv` then `v_proj_swiftkv`, stacked (a small copy)."""
        projections = [projection for leader in self.group_leaders
                       for projection in (self.decoder.layers[leader].self_attn.k_proj_swiftkv,
                                          self.decoder.layers[leader].self_attn.v_proj_swiftkv)]
        weight = torch.cat([p.weight.detach() for p in projections])
        has_bias = projections[0].bias is not None
        return weight, torch.cat([p.bias.detach() for p in projections]) if has_bias else None

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _slots(self, sequence, start: int, end: int) -> torch.Tensor:
        return slot_ids(sequence.block_table, self.block_size, start, end).to(self.device)

    # A step's chunks -> one packed batch

    def run(self, chunks: list[Chunk]) -> list[Optional[torch.Tensor]]:
        """Run a step's chunks (their blocks reserved) in one forward: the logits `[vocab]` of each chunk that
        ends its sequence, None for a chunk that ends mid-prompt."""
        if self.decode_graphs is not None and self.decode_graphs.can_run(chunks):
            return list(self.decode_graphs.run(chunks))
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i]) > 1)  # single queries first, stable
        logits = self.forward(self._batch([chunks[i] for i in order]))
        results: list[Optional[torch.Tensor]] = [None] * len(chunks)
        for row, index in enumerate(i for i in order if chunks[i].wants_logits):
            results[index] = logits[row]
        return results

    def _batch(self, chunks: list[Chunk]) -> Batch:
        """`chunks` with the single-token ones first -> the packed `Batch`."""
        singles = [chunk for chunk in chunks if len(chunk) == 1]
        spans, first = [], len(singles)
        for chunk in chunks[len(singles):]:
            spans.append(self._prompt_span(chunk, first))
            first += len(chunk)
        wanting = [chunk for chunk in chunks if chunk.wants_logits]
        ends = torch.tensor([len(chunk) for chunk in chunks]).cumsum(0)
        all_want_logits = len(wanting) == len(chunks) == len(singles)
        rows = self._query_rows([(chunk.sequence, chunk.end) for chunk in singles])
        upper_rows = None
        if self.swiftkv:
            upper_rows = rows if all_want_logits else \
                self._query_rows([(chunk.sequence, chunk.end) for chunk in wanting])
        return Batch(
            input_ids=self._tensor([t for chunk in chunks for t in chunk.sequence.token_ids[chunk.start:chunk.end]]),
            positions=self._tensor([p for chunk in chunks for p in range(chunk.start, chunk.end)]),
            write_slots=torch.cat([self._slots(chunk.sequence, chunk.start, chunk.end) for chunk in chunks]),
            rows=rows,
            spans=spans,
            logit_tokens=None if all_want_logits else
            (ends - 1)[torch.tensor([chunk.wants_logits for chunk in chunks])].to(self.device),
            upper_rows=upper_rows,
        )

    def _query_rows(self, contexts: list[tuple]) -> QueryRows:
        """(sequence, keys) of single-query rows -> how they attend: in place row by row when every row's slots
        are one range and that is the faster way (see GATHERED_ROWS_MAX_MEAN_KEYS), else gathered as one batch."""
        if not contexts:
            return QueryRows([])
        lengths = [keys for _, keys in contexts]
        if self.paged_kernel is not None:
            tables = self.block_tables([sequence for sequence, _ in contexts], lengths)
            return QueryRows(lengths, block_tables=tables.to(self.device),
                             key_counts=torch.tensor(lengths, dtype=torch.int32).to(self.device))
        one = len(contexts) == 1
        row_by_row = self.device.type == "cpu" and sum(lengths) > GATHERED_ROWS_MAX_MEAN_KEYS * len(lengths)
        if not self.quantized and (one or row_by_row):
            starts = [contiguous_start(sequence.block_table, self.block_size, keys) for sequence, keys in contexts]
            if None not in starts:
                return QueryRows(lengths, in_place_starts=starts)
        read = torch.nn.utils.rnn.pad_sequence([self._slots(s, 0, keys) for s, keys in contexts], batch_first=True)
        mask = None if one else torch.arange(read.shape[1], device=self.device)[None, :] < self._tensor(lengths)[:, None]
        return QueryRows(lengths, read_slots=read, mask=mask)

    def block_tables(self, sequences: list, lengths: list[int], rows: int = 0) -> torch.Tensor:
        """The blocks holding each sequence's first `lengths` keys, `[max(rows, sequences), most blocks]` int32
        on the CPU, padded with the scratch block (as are the rows past the sequences'). At least two blocks
        wide, so that a compiled decode step never specialises on a width of 1 (engine/compiled.py)."""
        width = max(2, *(-(-keys // self.block_size) for keys in lengths))
        tables = [sequence.block_table[:width] for sequence in sequences]
        tables += [[]] * (rows - len(tables))
        return torch.tensor([table + [self.scratch_block] * (width - len(table)) for table in tables],
                            dtype=torch.int32)

    def _prompt_span(self, chunk: Chunk, first: int) -> PromptSpan:
        sequence, keys = chunk.sequence, chunk.end
        if self.prompt_kernel is not None:
            table = sequence.block_table[:-(-keys // self.block_size)]
            return PromptSpan(first, len(chunk), keys, block_table=torch.tensor(table, dtype=torch.int32))
        start = None if self.quantized else contiguous_start(sequence.block_table, self.block_size, keys)
        mask = None
        if chunk.start > 0:  # earlier chunks' keys: all visible; this chunk's: causal
            positions = torch.arange(chunk.start, chunk.end, device=self.device)
            mask = torch.arange(keys, device=self.device)[None, :] <= positions[:, None]
        return PromptSpan(first, len(chunk), keys, start, None if start is not None else self._slots(sequence, 0, keys),
                          mask)

    # Attention

    def _attend(self, query: torch.Tensor, entry: int, rows: QueryRows, spans: list[PromptSpan]) -> torch.Tensor:
        """query `[tokens, heads, d]` (single-query rows first, then the spans' tokens) -> `[tokens, heads * d]`."""
        parts = [self._attend_rows(query[:rows.count], entry, rows)] if rows.count else []
        parts += [self._attend_span(query[span.first:span.first + span.count], entry, span) for span in spans]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _attend_rows(self, query: torch.Tensor, entry: int, rows: QueryRows) -> torch.Tensor:
        if rows.block_tables is not None:
            return self.paged_kernel(query, self.k_cache[entry], self.v_cache[entry], rows.block_tables,
                                     rows.key_counts, self.block_size, self.scaling, **self._scales(entry))
        if rows.in_place_starts is not None:
            parts = [self._attend_in_place(query[row], entry, start, length)
                     for row, (start, length) in enumerate(zip(rows.in_place_starts, rows.lengths))]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        keys = self._read(self.k_cache, "k_scale", entry, rows.read_slots)  # [kv_heads, b, T, d]
        values = self._read(self.v_cache, "v_scale", entry, rows.read_slots)
        with onednn(enabled=True):
            return self._attend_one_query(query, keys, values, rows.mask)

    def _scales(self, entry: int) -> dict:
        """The kernels' scale arguments: an 8-bit cache's (the CPU kernels read them only from a tiled int8 cache),
        else none."""
        return dict(k_scale=self.k_scale[entry], v_scale=self.v_scale[entry]) if self.quantized else {}

    def _attend_in_place(self, query: torch.Tensor, entry: int, start: int, length: int) -> torch.Tensor:
        """One query `[heads, d]` over the contiguous slots `[start, start + length)`: the fused SDPA kernel reads
        K/V straight from the cache (no gather), with the KV heads as its batch -> `[1, heads * d]`."""
        heads, head_dim = query.shape[0], self.head_dim
        grouped = query.reshape(self.num_kv_heads, 1, heads // self.num_kv_heads, head_dim)
        keys = self.k_cache[entry, :, start:start + length].unsqueeze(1)  # [kv_heads, 1, T, d], a view
        values = self.v_cache[entry, :, start:start + length].unsqueeze(1)
        output = F.scaled_dot_product_attention(grouped, keys, values, scale=self.scaling)
        return output.reshape(1, heads * head_dim)

    def _attend_one_query(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Single-query rows `[b, heads, d]` as two small matmuls over the query heads that share a KV head.
        keys/values: `[kv_heads, b, T, d]` (gathered, padded), so both matmuls run over contiguous (head, row)
        batches (`benchmarks/decode_attention.py` compares the kernels)."""
        rows, heads, head_dim = query.shape
        grouped = query.reshape(rows, self.num_kv_heads, heads // self.num_kv_heads, head_dim).transpose(0, 1)
        scores = torch.matmul(grouped, keys.transpose(-1, -2)) * self.scaling  # [kv_heads, b, group, T]
        if mask is not None:
            scores = scores.masked_fill(~mask.reshape(1, rows, 1, -1), float("-inf"))
        probabilities = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        output = torch.matmul(probabilities, values)  # [kv_heads, b, group, d]
        return output.transpose(0, 1).reshape(rows, heads * head_dim)

    def _attend_span(self, query: torch.Tensor, entry: int, span: PromptSpan) -> torch.Tensor:
        """A prompt chunk's queries `[n, heads, d]`, causal over its sequence's first `span.keys` keys."""
        if span.block_table is not None:
            return self.prompt_kernel(query, self.k_cache[entry], self.v_cache[entry], span.block_table, span.keys,
                                      self.block_size, self.scaling, **self._scales(entry))
        if span.in_place_start is not None:
            start, end = span.in_place_start, span.in_place_start + span.keys
            keys, values = self.k_cache[entry, None, :, start:end], self.v_cache[entry, None, :, start:end]
        else:
            keys = self._read(self.k_cache, "k_scale", entry, span.read_slots[None]).transpose(0, 1)
            values = self._read(self.v_cache, "v_scale", entry, span.read_slots[None]).transpose(0, 1)
        mask = None if span.mask is None else span.mask[None, None]
        output = F.scaled_dot_product_attention(query.transpose(0, 1)[None], keys, values, attn_mask=mask,
                                                is_causal=mask is None, scale=self.scaling, enable_gqa=True)
        return output[0].transpose(0, 1).reshape(span.count, -1)

    # The cache

    def _read(self, cache: torch.Tensor, scale_name: str, entry: int, slots: torch.Tensor) -> torch.Tensor:
        """K or V of `slots` `[b, T]` -> `[kv_heads, b, T, d]` (padding slots read whatever is there)."""
        flat = slots.reshape(-1)
        states = cache[entry].index_select(1, flat)
        if self.quantized:
            states = self._decoded(states) * getattr(self, scale_name)[entry].index_select(1, flat)
        return states.view(self.num_kv_heads, *slots.shape, self.head_dim)

    def _decoded(self, stored: torch.Tensor) -> torch.Tensor:
        return (stored.view(torch.float8_e4m3fn) if self.kv_cache_dtype == "fp8" else stored).to(self.dtype)

    def _encoded(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_kv(states, self.kv_cache_dtype)

    def _write(self, entries: slice, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """K/V `[tokens, len(entries), kv_heads, d]` of the tokens at `slots` `[tokens]` into cache `entries`."""
        for cache, scale_name, states in ((self.k_cache, "k_scale", keys), (self.v_cache, "v_scale", values)):
            states = states.permute(1, 2, 0, 3)  # [entries, kv_heads, tokens, d]
            if self.tiled_cache:  # one C++ op, eager or compiled; an int8 cache's quantization included
                paged_attention_cpu.write_tiled_kv_cache(cache, entries.start, entries.stop, slots, states,
                                                         values=cache is self.v_cache,
                                                         scales=getattr(self, scale_name, None))
                continue
            if self.quantized:
                states, scale = self._encoded(states)
                getattr(self, scale_name)[entries].index_copy_(2, slots, scale.to(self.dtype))
            if torch.compiler.is_compiling():  # one opaque in-place op: inductor would copy the whole cache
                self.compiled_kv_write(cache, entries.start, entries.stop, slots, states)
                continue
            cache[entries].index_copy_(2, slots, states)

    # Layers

    @staticmethod
    def _norm(norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The checkpoint's RMSNorm (float32 statistics, scaled in the model's dtype) as one fused kernel."""
        normed = F.rms_norm(hidden.float(), norm.weight.shape, eps=norm.variance_epsilon)
        return norm.weight * normed.to(hidden.dtype)

    def _layer(self, index: int, hidden: torch.Tensor, rope: tuple, batch: Batch, rows: QueryRows,
               spans: list[PromptSpan]) -> torch.Tensor:
        """One decoder layer over packed tokens `hidden` `[tokens, hidden]`. Layers `< l` write their K/V; a
        SwiftKV layer only reads its group's, which SingleInputKV wrote."""
        layer = self.decoder.layers[index]
        attention = layer.self_attn
        heads, kv_heads = self.num_heads, self.num_kv_heads
        writes = index < self.num_full_layers
        normed = self._norm(layer.input_layernorm, hidden)
        projected = (attention.qkv_proj if writes else attention.q_proj_swiftkv)(normed)
        projected = projected.view(hidden.shape[0], -1, self.head_dim)
        rotated = _rope(projected[:, :heads + kv_heads] if writes else projected, *rope)  # q and k at once
        entry = self.kv_entry[index]
        if writes:
            self._write(slice(entry, entry + 1), batch.write_slots, rotated[:, None, heads:],
                        projected[:, None, heads + kv_heads:])
        hidden = hidden + attention.o_proj(self._attend(rotated[:, :heads], entry, rows, spans))
        return hidden + self._mlp(layer, self._norm(layer.post_attention_layernorm, hidden))

    @staticmethod
    def _mlp(layer, normed: torch.Tensor) -> torch.Tensor:
        gate, up = layer.mlp.gate_up_proj(normed).chunk(2, dim=-1)
        return layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    def _write_single_input_kv(self, hidden: torch.Tensor, rope: tuple, write_slots: torch.Tensor) -> None:
        """SingleInputKV + AcrossKV: K/V of every group from `norm_swiftkv(hidden)` (layer l-1's output), as one
        matmul over the groups' stacked projections, written to the groups' consecutive cache entries."""
        tokens, groups = hidden.shape[0], len(self.group_leaders)
        projected = self.single_input_kv_linear(self.decoder.norm_swiftkv(hidden), *self.single_input_kv)
        projected = projected.view(tokens, groups, 2, self.num_kv_heads, self.head_dim)
        keys = _rope(projected[:, :, 0].reshape(tokens, groups * self.num_kv_heads, self.head_dim), *rope)
        first = self.kv_entry[self.group_leaders[0]]
        self._write(slice(first, first + groups), write_slots,
                    keys.view(tokens, groups, self.num_kv_heads, self.head_dim), projected[:, :, 1])

    @torch.inference_mode()
    def forward(self, batch: Batch) -> Optional[torch.Tensor]:
        """Logits `[logit tokens, vocab]`, or None when no token of the batch wants them.

        One token of one sequence is a chain of matrix-vector products that only stream weights; oneDNN's
        bf16 GEMV reads them at well under half the memory bandwidth that ATen's own GEMV reaches on CPU
        (benchmarks/roofline.py), so that case runs with oneDNN off.
        """
        single_token = batch.input_ids.numel() == 1 and self.device.type == "cpu"
        if self.compiled_decode is not None and self._compiled_step(batch, single_token):
            # its start-up graphs: guards checked at compile only (compiled.py)
            try:
                with onednn(enabled=not single_token), \
                        torch.compiler.set_stance(skip_guard_eval_unsafe=SKIP_COMPILED_GUARDS):
                    return self.compiled_decode(batch)
            except Exception:
                if single_token:
                    raise
                # a batch the start-up graph does not cover: eager from now on, not every row alone
                logger.warning("compiled decode of %d rows failed; batches decode eagerly from now on",
                               batch.rows.count, exc_info=True)
                self.compiled_batches = False
        with onednn(enabled=not single_token):
            return self._forward(batch)

    def _compiled_step(self, batch: Batch, single_token: bool) -> bool:
        """Whether `batch` has the structure of a compiled start-up step: one decode row read in place or through
        block tables, or several decode rows (and nothing else) through the paged kernel."""
        if single_token:
            return batch.rows.read_slots is None
        return (self.compiled_batches and not batch.spans and batch.logit_tokens is None
                and batch.rows.block_tables is not None)

    def _forward(self, batch: Batch) -> Optional[torch.Tensor]:
        hidden = self.decoder.embed_tokens(batch.input_ids)  # [tokens, hidden]
        cos, sin = self.decoder.rotary_emb(hidden[None], batch.positions[None])
        rope = (cos[0, :, None], _signed_sin(sin[0, :, None]))  # [tokens, 1, d], broadcast over heads
        for index in range(self.num_full_layers):
            hidden = self._layer(index, hidden, rope, batch, batch.rows, batch.spans)
        if self.swiftkv:
            self._write_single_input_kv(hidden, rope, batch.write_slots)
        if not batch.wants_logits:
            return None  # the SwiftKV saving: mid-prompt chunks never touch layers >= l
        if batch.logit_tokens is not None:
            hidden, rope = hidden[batch.logit_tokens], tuple(t[batch.logit_tokens] for t in rope)
        for index in range(self.num_full_layers, self.num_layers):
            hidden = self._layer(index, hidden, rope, batch, batch.upper_rows, [])
        return self.model.lm_head(self._norm(self.decoder.norm, hidden)).float()


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: `rotate_half(x) * sin == roll(x, d/2) * signed_sin`, bit for bit."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def _rope(states: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the checkpoint computes it (`x * cos + rotate_half(x) * sin`), with one roll for the rotation."""
    return states * cos + torch.roll(states, states.shape[-1] // 2, dims=-1) * signed_sin
