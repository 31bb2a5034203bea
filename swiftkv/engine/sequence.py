"""A request as the engine sees it: tokens, progress through prefill, its KV blocks, and timings."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

import torch

from swiftkv.engine.detokenizer import DetokenizerState
from swiftkv.engine.sampling_params import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"      # needs (more) prefill
    RUNNING = "running"      # decoding
    FINISHED = "finished"


@dataclass(eq=False)  # a request is itself: compared by identity
class Sequence:
    token_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0             # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: Optional[str] = None
    text: str = ""
    detokenizer: DetokenizerState = field(default_factory=DetokenizerState)
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: Optional[float] = None
    token_times: list[float] = field(default_factory=list)
    generator: Optional[torch.Generator] = None
    num_preemptions: int = 0
    logprobs: list = field(default_factory=list)  # one `TokenLogprobs` per output token, when params ask
    error: Optional[str] = None            # why the engine ended this request (finish_reason "error")

    def __post_init__(self) -> None:
        self.num_prompt_tokens = self.num_prompt_tokens or len(self.token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(frozen=True)
class Chunk:
    """Tokens `[start, end)` of a sequence to run in one step: part of a prompt, or the one new token of a
    decoding sequence (`[len - 1, len)`). Its logits are wanted only when it ends the sequence."""

    sequence: Sequence
    start: int
    end: int

    @property
    def wants_logits(self) -> bool:
        return self.end == len(self.sequence)

    def __len__(self) -> int:
        return self.end - self.start
