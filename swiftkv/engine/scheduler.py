"""Continuous batching: each step decodes every running sequence and advances one prompt by a chunk.

Memory runs out -> the newest running sequence is preempted: its blocks are freed and it goes back to
the front of the queue, to be prefilled again (prompt + tokens so far) when memory frees up. Nothing is
lost and nothing crashes; a request that cannot fit even alone is rejected when it is added.

With `reserve_output_tokens` (the default) a new prompt is admitted only while every admitted sequence can
still grow to its `max_tokens`, so preemption never happens: recomputing a 2k-token prompt costs seconds
on a CPU, far more than the concurrency that optimistic admission gains.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from swiftkv.engine.block_manager import BlockManager
from swiftkv.engine.config import EngineConfig
from swiftkv.engine.sequence import Sequence, Status


@dataclass
class ScheduledStep:
    prefill: Optional[Sequence] = None
    prefill_range: tuple[int, int] = (0, 0)
    decode: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, eos_token_ids: set[int]):
        self.config, self.blocks, self.eos_token_ids = config, block_manager, eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, sequence: Sequence) -> None:
        self.running.remove(sequence)
        self.blocks.free(sequence)
        sequence.status = Status.WAITING
        sequence.num_preemptions += 1
        self.waiting.appendleft(sequence)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        for sequence in list(self.running):  # each decode writes one more token's KV
            while sequence in self.running and not self.blocks.can_reserve(sequence, len(sequence)):
                self._preempt(self.running[-1])
            if sequence in self.running:
                self.blocks.reserve(sequence, len(sequence))
                step.decode.append(sequence)
        if self.waiting and len(self.running) < self.config.max_num_seqs:
            sequence = self.waiting[0]
            start = sequence.num_cached_tokens
            end = min(len(sequence), start + self.config.max_prefill_tokens)
            if self._admits(sequence) and self.blocks.can_reserve(sequence, end):
                self.blocks.reserve(sequence, end)
                step.prefill, step.prefill_range = sequence, (start, end)
        return step

    def _admits(self, sequence: Sequence) -> bool:
        """Room for `sequence` and every running sequence to reach prompt + max_tokens (or nothing runs)."""
        if not self.config.reserve_output_tokens or not self.running:
            return True
        admitted = [*self.running, sequence]
        needed = sum(self.blocks.blocks_needed(s, s.num_prompt_tokens + s.params.max_tokens) for s in admitted)
        return needed <= len(self.blocks.free_blocks)

    def prefill_done(self, sequence: Sequence, end: int) -> None:
        sequence.num_cached_tokens = end
        if end == len(sequence):
            self.waiting.remove(sequence)
            sequence.status = Status.RUNNING
            self.running.append(sequence)

    def postprocess(self, sequence: Sequence, token: int, now: float) -> None:
        """Append a sampled token; finish the request on a stop token, EOS or `max_tokens`."""
        params = sequence.params
        sequence.token_ids.append(token)
        sequence.first_token_time = sequence.first_token_time or now
        sequence.token_times.append(now)
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            self.finish(sequence, "stop")
        elif len(sequence) - sequence.num_prompt_tokens >= params.max_tokens:
            self.finish(sequence, "length")

    def finish(self, sequence: Sequence, reason: str) -> None:
        sequence.status, sequence.finish_reason = Status.FINISHED, reason
        if sequence in self.running:
            self.running.remove(sequence)
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        self.blocks.free(sequence)
