"""The engine loop (schedule -> run -> sample -> update) and the `LLM` API users know from vLLM."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Optional, Union

import torch

from swiftkv.engine.block_manager import BlockManager
from swiftkv.engine.config import EngineConfig
from swiftkv.engine.detokenizer import next_text
from swiftkv.engine.model_runner import ModelRunner
from swiftkv.engine.quantized import fuse_projections, quantize_weights
from swiftkv.engine.sampler import sample, token_logprobs
from swiftkv.engine.sampling_params import SamplingParams
from swiftkv.engine.scheduler import Scheduler
from swiftkv.engine.sequence import Sequence, Status

Prompt = Union[str, list[int]]
# Prompt tokens per step by default: on a CPU a 1024-token chunk already runs the matrix units at full speed
# and each step holds up the decoding streams; on a GPU a step's fixed cost (~20 ms of launches for an 8B model)
# is paid per step, so bigger chunks (vLLM's default budget) serve more.
CPU_PREFILL_TOKENS, GPU_PREFILL_TOKENS = 1024, 8192
logger = logging.getLogger(__name__)


@dataclass
class TokenEvent:
    """One step's news for a request: a new token, the text it adds, and whether the request ended."""

    sequence: Sequence
    token_id: int
    text_delta: str
    finished: bool


@dataclass
class StepStats:
    """What the last step ran: decode rows of running requests and prompt tokens (prefill chunks)."""

    decode_rows: int = 0
    prompt_tokens: int = 0


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
    logprobs: list = field(default_factory=list)  # `TokenLogprobs` per token, when SamplingParams.logprobs is set
    error: Optional[str] = None                   # why the request failed (finish_reason "error")


class LLMEngine:
    def __init__(self, model, tokenizer, config: Optional[EngineConfig] = None):
        """The engine owns `model`: it fuses its projections and, with `config.weights` int8/int4, quantizes
        them, in place (the model still runs in transformers, computing what the engine computes)."""
        config = config or EngineConfig()
        self.tokenizer, self.config = tokenizer, config
        quantize_weights(fuse_projections(model), config.weights)
        self.runner = ModelRunner(model, int(config.kv_cache_memory_gb * 2**30), config.block_size,
                                  config.kv_cache_dtype)
        if config.max_prefill_tokens is None:  # a GPU runs big chunks at full speed; a CPU's would stall decodes
            config = self.config = replace(config, max_prefill_tokens=GPU_PREFILL_TOKENS if
                                           self.runner.device.type == "cuda" else CPU_PREFILL_TOKENS)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, first_block=self.runner.first_block)
        self.max_model_length = getattr(model.config, "max_position_embeddings", 2**31)
        if config.cuda_graphs and self.runner.device.type == "cuda" and self.runner.paged_kernel is not None:
            self.runner.capture_decode_graphs(config.max_num_seqs, self.max_model_length)
        if config.compile_decode and self.runner.device.type == "cpu":
            self.runner.compile_decode()
        self.vocab_size = model.get_input_embeddings().num_embeddings
        eos_token_ids = {tokenizer.eos_token_id} | set(_as_list(getattr(model.config, "eos_token_id", None)))
        self.scheduler = Scheduler(config, self.blocks, eos_token_ids - {None})
        self.last_step = StepStats()

    @classmethod
    def from_pretrained(cls, model: str, config: Optional[EngineConfig] = None) -> "LLMEngine":
        from swiftkv.loading import load_model, load_tokenizer

        config = config or EngineConfig()
        return cls(load_model(model, dtype=config.dtype, device=config.device), load_tokenizer(model), config)

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.capacity_tokens

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: Optional[str] = None) -> Sequence:
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else self.check_token_ids(prompt)
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

    def tokenize(self, text: str) -> list[int]:
        return self.check_token_ids(self.tokenizer(text, add_special_tokens=False).input_ids)

    def check_token_ids(self, token_ids) -> list[int]:
        """A prompt of token ids, each an int within the model's vocabulary (its embedding rows)."""
        token_ids = list(token_ids)
        if not token_ids:
            raise ValueError("the prompt is empty")
        for token in token_ids:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < self.vocab_size:
                raise ValueError(f"prompt token id {token!r} is not in the model's vocabulary "
                                 f"[0, {self.vocab_size})")
        return token_ids

    def abort(self, sequence: Sequence) -> None:
        """Stop a request (e.g. its client disconnected) and free its KV blocks."""
        if not sequence.is_finished:
            self.scheduler.finish(sequence, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[TokenEvent]:
        """One scheduling round; returns the tokens it produced and the requests that ended.

        The step's chunks (every decoding sequence's new token, prompt chunks) run as one forward. A request
        whose forward or sampling raises ends alone with finish_reason "error" (its `error` says why); the
        others in its batch run again without it, so no single request can stop the engine.
        """
        chunks = self.scheduler.schedule().chunks
        self.last_step = StepStats()
        if not chunks:
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress: the KV cache is too small for any waiting request")
            return []
        decode_rows = sum(chunk.sequence.status is Status.RUNNING for chunk in chunks)
        self.last_step = StepStats(decode_rows, sum(map(len, chunks)) - decode_rows)
        done, failed = _each_alone_on_failure(chunks, self.runner.run)
        logits = []
        for chunk, row in done:
            self.scheduler.ran(chunk)
            if row is not None:
                logits.append((chunk.sequence, row))
        failed = [(chunk.sequence, error) for chunk, error in failed]
        sampled, sampling_failed = _each_alone_on_failure(
            logits, lambda rows: sample(torch.stack([row for _, row in rows]), [s for s, _ in rows])) \
            if logits else ([], [])
        now = time.perf_counter()
        events = [self._fail(sequence, error) for sequence, error in failed]
        events += [self._fail(sequence, error) for (sequence, _), error in sampling_failed]
        for (sequence, row), token in sampled:
            try:
                events.append(self._append(sequence, token, row, now))
            except Exception as error:
                events.append(self._fail(sequence, error))
        return events

    def _fail(self, sequence: Sequence, error: Exception) -> TokenEvent:
        logger.error("request %s failed", sequence.request_id, exc_info=error)
        sequence.error = f"{type(error).__name__}: {error}"
        self.scheduler.finish(sequence, "error")
        return TokenEvent(sequence, -1, "", True)

    def _append(self, sequence: Sequence, token: int, logits: torch.Tensor, now: float) -> TokenEvent:
        """The scheduler appends the token (and ends the request on EOS, a stop token or max_tokens); here its
        text is decoded and checked for stop strings."""
        params = sequence.params
        if params.logprobs is not None:
            sequence.logprobs.append(token_logprobs(logits, token, params.logprobs))
        self.scheduler.postprocess(sequence, token, now)
        text = sequence.text + next_text(self.tokenizer, sequence.output_token_ids, sequence.detokenizer)
        if params.stop and len(text) > len(sequence.text):
            searched = max(0, len(sequence.text) - max(map(len, params.stop)) + 1)  # where a new match can start
            found = [at for at in (text.find(stop, searched) for stop in params.stop) if at >= 0]
            if found:
                text = text[:min(found)]
                self.scheduler.finish(sequence, "stop")
        delta = text[len(sequence.text):]  # empty when a stop string began in text already streamed
        sequence.text = text
        return TokenEvent(sequence, token, delta, sequence.is_finished)


def _each_alone_on_failure(items: list, compute: Callable[[list], Iterable]) -> tuple[list, list]:
    """`compute(items)` gives one result per item; returns ([(item, result)], [(item, error)]). When the
    batch raises, each item runs alone, so only the items that fail on their own are reported failed."""
    try:
        return list(zip(items, compute(items), strict=True)), []
    except Exception as error:
        if len(items) == 1:
            return [], [(items[0], error)]
    done, failed = [], []
    for item in items:
        item_done, item_failed = _each_alone_on_failure([item], compute)
        done, failed = done + item_done, failed + item_failed
    return done, failed


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def request_output(sequence: Sequence) -> RequestOutput:
    return RequestOutput(sequence.request_id, sequence.token_ids[:sequence.num_prompt_tokens],
                         sequence.output_token_ids, sequence.text, sequence.finish_reason or "",
                         (sequence.first_token_time or 0) - sequence.arrival_time,
                         (sequence.token_times[-1] if sequence.token_times else 0) - sequence.arrival_time,
                         sequence.num_preemptions, sequence.logprobs, sequence.error)


class LLM:
    """`LLM(model).generate(prompts, SamplingParams(...))`, as in vLLM; works on base and SwiftKV models.
    Keyword options are `EngineConfig` fields."""

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
