"""Paged KV memory: fixed-size blocks of token slots, handed to sequences and taken back.

One block holds `block_size` tokens for *every* KV cache entry of the model, so a SwiftKV model with
AcrossKV (fewer entries) fits more blocks, hence more tokens, in the same memory budget.

A sequence's slots are kept one contiguous range where the free blocks allow it, so attention can read them
in place (`contiguous_start`): a new sequence gets the first run of consecutive free blocks long enough for
it, and a sequence that grows takes the block after its last one when that block is free.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import torch

from swiftkv.engine.sequence import Sequence


class BlockManager:
    """Hands out blocks `first_block .. first_block + num_blocks - 1` (the runner keeps block 0 as scratch)."""

    def __init__(self, num_blocks: int, block_size: int, first_block: int = 0):
        if num_blocks < 1:
            raise ValueError("the KV cache budget holds no block: raise kv_cache_memory or lower block_size")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(first_block, first_block + num_blocks))
        self._free: set[int] = set(self.free_blocks)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def usage(self) -> float:
        return 1 - len(self.free_blocks) / self.num_blocks

    def blocks_needed(self, sequence: Sequence, num_tokens: int) -> int:
        """Extra blocks `sequence` needs so that `num_tokens` of it fit."""
        return max(0, -(-num_tokens // self.block_size) - len(sequence.block_table))

    def can_reserve(self, sequence: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(sequence, num_tokens) <= len(self.free_blocks)

    def reserve(self, sequence: Sequence, num_tokens: int) -> None:
        needed = self.blocks_needed(sequence, num_tokens)
        if needed > len(self.free_blocks):
            raise MemoryError("not enough free KV blocks")
        if needed and not sequence.block_table:
            sequence.block_table.append(self._take(self._first_run(needed)))
            needed -= 1
        for _ in range(needed):
            sequence.block_table.append(self._take(sequence.block_table[-1] + 1))

    def _first_run(self, length: int) -> Optional[int]:
        """First block of the lowest run of `length` consecutive free blocks, None when there is none."""
        run_start, run_length = None, 0
        for block in sorted(self._free):
            if run_length and block == run_start + run_length:
                run_length += 1
            else:
                run_start, run_length = block, 1
            if run_length == length:
                return run_start
        return None

    def _take(self, preferred) -> int:
        """`preferred` when it is free, else the block freed longest ago."""
        if preferred in self._free:
            self.free_blocks.remove(preferred)
            block = preferred
        else:
            block = self.free_blocks.popleft()
        self._free.discard(block)
        return block

    def free(self, sequence: Sequence) -> None:
        self.free_blocks.extend(sequence.block_table)
        self._free.update(sequence.block_table)
        sequence.block_table = []
        sequence.num_cached_tokens = 0


def slot_ids(block_table: list[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """Flat cache slot `block * block_size + offset` of each token position in [start, end)."""
    first, last = start // block_size, -(-end // block_size)
    blocks = torch.tensor(block_table[first:last], dtype=torch.long)
    slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()
    return slots[start - first * block_size:end - first * block_size]


def contiguous_start(block_table: list[int], block_size: int, num_tokens: int) -> Optional[int]:
    """First slot of the first `num_tokens` tokens when their slots are one contiguous range, else None."""
    table = block_table[:-(-num_tokens // block_size)]
    if any(following != block + 1 for block, following in zip(table, table[1:])):
        return None
    return table[0] * block_size
