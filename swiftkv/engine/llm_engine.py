"""The engine loop (schedule -> run -> sample -> update) and the `LLM` API users know from vLLM."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch

from swiftkv.engine.block_manager import BlockManager
from swiftkv.engine.model_runner import Batch, ModelRunner
from swiftkv.engine.sampler import sample
from swiftkv.engine.sampling_params import SamplingParams
from swiftkv.engine.scheduler import Scheduler, SchedulerConfig
from swiftkv.engine.sequence import Sequence

Prompt = Union[str, list[int]]


@dataclass
class EngineConfig:
    dtype: str = "bfloat16"
    kv_cache_memory_gb: float = 1.0
    block_size: int = 16
    max_num_seqs: int = 32
    max_prefill_tokens: int = 1024
    kv_cache_dtype: str = "auto"      # "int8": 8-bit K/V with per-token scales, ~2x the tokens
    reserve_output_tokens: bool = True  # admit a prompt only with KV room for every max_tokens: no preemption
    device: str = "cpu"


@dataclass
class TokenEvent:
    """One step's news for a request: a new token, the text it adds, and whether the request ended."""

    sequence: Sequence
    token_id: int
    text_delta: str
    finished: bool


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    ttft_s: float
    latency_s: float
    num_preemptions: int


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig()):
        self.tokenizer, self.config = tokenizer, config
        self.runner = ModelRunner(model, int(config.kv_cache_memory_gb * 2**30), config.block_size,
                                  config.kv_cache_dtype)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size)
        scheduling = SchedulerConfig(config.max_num_seqs, config.max_prefill_tokens, config.reserve_output_tokens)
        self.scheduler = Scheduler(scheduling, self.blocks)
        self.max_model_length = getattr(model.config, "max_position_embeddings", 2**31)
        self.eos_token_ids = {tokenizer.eos_token_id} | set(_as_list(getattr(model.config, "eos_token_id", None)))
        self.eos_token_ids.discard(None)

    @classmethod
    def from_pretrained(cls, model: str, config: EngineConfig = EngineConfig()) -> "LLMEngine":
        from swiftkv.loading import load_model, load_tokenizer

        return cls(load_model(model, dtype=config.dtype, device=config.device), load_tokenizer(model), config)

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.capacity_tokens

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: Optional[str] = None) -> Sequence:
        token_ids = self.tokenizer(prompt, add_special_tokens=False).input_ids if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_length:
            raise ValueError(f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context of {self.max_model_length} tokens")
        if total > self.capacity_tokens:
            raise ValueError(f"prompt + max_tokens ({total} tokens) exceeds the KV cache capacity of "
                             f"{self.capacity_tokens} tokens; raise kv_cache_memory_gb")
        sequence = Sequence(token_ids, params, **({"request_id": request_id} if request_id else {}))
        self.scheduler.add(sequence)
        return sequence

    def abort(self, sequence: Sequence) -> None:
        """Stop a request (e.g. its client disconnected) and free its KV blocks."""
        if not sequence.is_finished:
            self.scheduler.finish(sequence, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.runner.device)

    def _prefill_batch(self, sequence: Sequence, start: int, end: int) -> Batch:
        positions = torch.arange(start, end, device=self.runner.device)
        keys = torch.arange(end, device=self.runner.device)
        return Batch(
            input_ids=self._tensor(sequence.token_ids[start:end])[None],
            positions=positions[None],
            write_slots=self.blocks.slots(sequence, start, end).to(self.runner.device),
            read_slots=self.blocks.slots(sequence, 0, end).to(self.runner.device)[None],
            attention_mask=None if start == 0 else (keys[None, :] <= positions[:, None])[None, None],
            wants_logits=end == len(sequence),
        )

    def _decode_batch(self, sequences: list[Sequence]) -> Batch:
        lengths = [len(s) for s in sequences]
        read = torch.nn.utils.rnn.pad_sequence([self.blocks.slots(s, 0, len(s)) for s in sequences],
                                               batch_first=True)
        width = read.shape[1]
        return Batch(
            input_ids=self._tensor([[s.token_ids[-1]] for s in sequences]),
            positions=self._tensor([[n - 1] for n in lengths]),
            write_slots=read[torch.arange(len(sequences)), torch.tensor(lengths) - 1].to(self.runner.device),
            read_slots=read.to(self.runner.device),
            attention_mask=None if len(sequences) == 1 else
            (torch.arange(width, device=self.runner.device)[None, :] < self._tensor(lengths)[:, None])[:, None, None],
        )

    def step(self) -> list[TokenEvent]:
        """One scheduling round; returns the tokens it produced."""
        scheduled = self.scheduler.schedule()
        sampled: list[tuple[Sequence, torch.Tensor]] = []
        if scheduled.decode:
            logits = self.runner.forward(self._decode_batch(scheduled.decode))
            sampled += list(zip(scheduled.decode, logits))
        if scheduled.prefill is not None:
            start, end = scheduled.prefill_range
            logits = self.runner.forward(self._prefill_batch(scheduled.prefill, start, end))
            self.scheduler.prefill_done(scheduled.prefill, end)
            if logits is not None:
                sampled.append((scheduled.prefill, logits[0]))
        if not sampled:
            if self.scheduler.has_unfinished() and scheduled.prefill is None and not scheduled.decode:
                raise RuntimeError("scheduler made no progress: the KV cache is too small for any waiting request")
            return []
        sequences = [s for s, _ in sampled]
        tokens = sample(torch.stack([l for _, l in sampled]), sequences)
        now = time.perf_counter()
        return [self._append(sequence, token, now) for sequence, token in zip(sequences, tokens)]

    def _append(self, sequence: Sequence, token: int, now: float) -> TokenEvent:
        params = sequence.params
        sequence.token_ids.append(token)
        sequence.first_token_time = sequence.first_token_time or now
        sequence.token_times.append(now)
        text = self.tokenizer.decode(sequence.output_token_ids, skip_special_tokens=True)
        reason = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        stop_at = min((text.find(s) for s in params.stop if s in text), default=-1)
        if stop_at >= 0:
            text, reason = text[:stop_at], "stop"
        if reason is None and len(sequence.output_token_ids) >= params.max_tokens:
            reason = "length"
        delta = text[len(sequence.text):] if text.startswith(sequence.text) else ""
        sequence.text = text
        if reason is not None:
            self.scheduler.finish(sequence, reason)
        return TokenEvent(sequence, token, delta, reason is not None)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def request_output(sequence: Sequence) -> RequestOutput:
    return RequestOutput(sequence.request_id, sequence.token_ids[:sequence.num_prompt_tokens],
                         sequence.output_token_ids, sequence.text, sequence.finish_reason or "",
                         (sequence.first_token_time or 0) - sequence.arrival_time,
                         (sequence.token_times[-1] if sequence.token_times else 0) - sequence.arrival_time,
                         sequence.num_preemptions)


class LLM:
    """`LLM(model).generate(prompts, SamplingParams(...))`, as in vLLM; works on base and SwiftKV models."""

    def __init__(self, model: str, **engine_options):
        self.engine = LLMEngine.from_pretrained(model, EngineConfig(**engine_options))

    def generate(self, prompts: Union[Prompt, list[Prompt]], params: Optional[SamplingParams] = None,
                 progress: bool = False) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        prompts = [prompts] if single else prompts
        sequences = [self.engine.add_request(p, params or SamplingParams()) for p in prompts]
        with tqdm(total=len(sequences), desc="generate", disable=not progress) as bar:
            while self.engine.has_unfinished():
                bar.update(sum(event.finished for event in self.engine.step()))
        return [request_output(s) for s in sequences]

    def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None) -> Iterator[str]:
        """Text deltas of one request as tokens are produced."""
        sequence = self.engine.add_request(prompt, params or SamplingParams())
        while not sequence.is_finished:
            for event in self.engine.step():
                if event.sequence is sequence and event.text_delta:
                    yield event.text_delta
