"""Continuous batching: each step runs the new token of every decoding sequence and prompt chunks of as many
waiting prompts as `max_prefill_tokens` allows, all in one forward (`ScheduledStep.chunks`), so a long prompt
arriving slows the running streams by one shared step instead of stalling them behind its own forwards.

A prompt is admitted (FIFO) when its blocks fit: the whole prompt, and with `reserve_output_tokens` (the
default) also its `max_tokens`, so an admitted sequence never waits for memory and preemption never happens:
recomputing a 2k-token prompt costs seconds on a CPU, far more than the concurrency that optimistic admission
gains. Reserving at admission also gives the sequence one run of consecutive blocks when there is one, so
attention reads its K/V in place.

Without the reservation, a decoding sequence that finds no free block preempts the newest running one: its
blocks are freed and it goes back to the front of the queue, to be prefilled again (prompt + tokens so far)
when memory frees up. Nothing is lost and nothing crashes; a request that cannot fit even alone is rejected
when it is added.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from swiftkv.engine.block_manager import BlockManager
from swiftkv.engine.config import EngineConfig
from swiftkv.engine.sequence import Chunk, Sequence, Status


@dataclass
class ScheduledStep:
    chunks: list[Chunk] = field(default_factory=list)  # decode tokens first, then prompt chunks


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, eos_token_ids: set[int]):
        self.config, self.blocks, self.eos_token_ids = config, block_manager, eos_token_ids
        self.waiting: deque[Sequence] = deque()  # prompts not yet (fully) prefilled; admitted ones hold blocks
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
                step.chunks.append(Chunk(sequence, len(sequence) - 1, len(sequence)))
        budget, admitting = self.config.max_prefill_tokens, True
        for sequence in list(self.waiting):
            if budget == 0:
                break
            if not sequence.block_table:  # not admitted yet: in order of arrival, while they fit
                admitting = admitting and self._num_admitted() < self.config.max_num_seqs and self._admit(sequence)
                if not admitting:
                    continue  # admitted prompts further back still get their chunks
            start = sequence.num_cached_tokens
            end = min(len(sequence), start + budget)
            step.chunks.append(Chunk(sequence, start, end))
            budget -= end - start
        return step

    def _num_admitted(self) -> int:
        return len(self.running) + sum(bool(sequence.block_table) for sequence in self.waiting)

    def _admit(self, sequence: Sequence) -> bool:
        """Reserve the blocks of the whole prompt (+ max_tokens with `reserve_output_tokens`), or say no."""
        tokens = len(sequence)
        if self.config.reserve_output_tokens:
            tokens = max(tokens, sequence.num_prompt_tokens + sequence.params.max_tokens)
        if not self.blocks.can_reserve(sequence, tokens):
            return False
        self.blocks.reserve(sequence, tokens)
        return True

    def ran(self, chunk: Chunk) -> None:
        """`chunk`'s K/V are in the cache; a prompt whose last chunk ran starts decoding."""
        sequence = chunk.sequence
        sequence.num_cached_tokens = chunk.end
        if sequence.status is Status.WAITING and chunk.end == len(sequence):
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
