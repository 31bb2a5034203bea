"""Decode steps replayed from CUDA graphs, as nano-vllm and vLLM do.

A decode step is a few hundred small kernels (a 32-layer model: norms, projections, RoPE, the KV write,
attention, MLP, per layer); launched one by one from Python they take far longer than the GPU needs to stream
the weights. Captured once per batch-size bucket over static input buffers, the whole step is one replay.

What makes the step capturable: every shape depends only on the bucket (rows are padded up to it), and the
attention kernel reads each row's context length and blocks from tensors (engine/paged_attention.py). Padding
rows write their K/V to the runner's scratch block and attend over its first slot, so they touch no
sequence's cache; their logits are dropped.
"""

from __future__ import annotations

import torch

from swiftkv.engine.sequence import Chunk


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to `max_batch` (which is always one)."""
    small = [size for size in (1, 2, 4, 8) if size < max_batch]
    return small + list(range(16, max_batch, 16)) + [max_batch]


class DecodeGraphs:
    """One captured decode step per bucket, sharing one memory pool; `run` copies a step's inputs into the
    static buffers and replays the smallest bucket that holds it."""

    def __init__(self, runner, max_batch: int, max_blocks: int):
        from swiftkv.engine.model_runner import Batch, QueryRows

        self.runner, self.buckets = runner, batch_buckets(max_batch)
        largest, device = self.buckets[-1], runner.device
        with torch.inference_mode():
            self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
            self.positions = torch.zeros(largest, dtype=torch.long, device=device)
            self.write_slots = torch.full((largest,), runner.scratch_block * runner.block_size, device=device)
            self.key_counts = torch.ones(largest, dtype=torch.int32, device=device)
            self.block_tables = torch.full((largest, max_blocks), runner.scratch_block, dtype=torch.int32,
                                           device=device)
            self.graphs, self.logits = {}, {}
            pool = None
            for size in reversed(self.buckets):  # the largest first: the smaller ones reuse its memory
                rows = QueryRows([1] * size, block_tables=self.block_tables[:size], key_counts=self.key_counts[:size])
                batch = Batch(self.input_ids[:size], self.positions[:size], self.write_slots[:size], rows,
                              upper_rows=rows if runner.swiftkv else None)
                runner._forward(batch)  # warm-up: compiles the attention kernel for this shape
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[size] = runner._forward(batch)
                self.graphs[size], pool = graph, graph.pool()

    def can_run(self, chunks: list[Chunk]) -> bool:
        """A decode-only step (each chunk one token that wants logits) that fits the largest bucket."""
        return len(chunks) <= self.buckets[-1] and all(len(chunk) == 1 and chunk.wants_logits for chunk in chunks)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits `[len(chunks), vocab]` of a decode-only step."""
        size = len(chunks)
        bucket = next(b for b in self.buckets if b >= size)
        block_size, scratch, padding = self.runner.block_size, self.runner.scratch_block, bucket - size
        inputs = torch.tensor([  # token, position, write slot, key count of each row, then the padding rows'
            [chunk.sequence.token_ids[chunk.start] for chunk in chunks] + [0] * padding,
            [chunk.start for chunk in chunks] + [0] * padding,
            [chunk.sequence.block_table[chunk.start // block_size] * block_size + chunk.start % block_size
             for chunk in chunks] + [scratch * block_size] * padding,
            [chunk.end for chunk in chunks] + [1] * padding,
        ]).to(self.runner.device)
        tables = self.runner.block_tables([chunk.sequence for chunk in chunks], [chunk.end for chunk in chunks], bucket)
        width = tables.shape[1]
        self.input_ids[:bucket].copy_(inputs[0])
        self.positions[:bucket].copy_(inputs[1])
        self.write_slots[:bucket].copy_(inputs[2])
        self.key_counts[:bucket].copy_(inputs[3])
        self.block_tables[:bucket, :width].copy_(tables.to(self.runner.device))
        self.graphs[bucket].replay()
        return self.logits[bucket][:size].clone()
