"""Next-token choice per sequence: greedy, or temperature with top-k / top-p, optionally seeded."""

from __future__ import annotations

import torch

from swiftkv.engine.sequence import Sequence


def sample(logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
    """logits `[batch, vocab]` (float32) -> one token id per sequence."""
    tokens = []
    greedy = logits.argmax(-1).tolist()
    for row, sequence in enumerate(sequences):
        params = sequence.params
        if params.greedy:
            tokens.append(greedy[row])
            continue
        scores = logits[row] / params.temperature
        if params.top_k:
            kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1:
            sorted_scores, order = scores.sort(descending=True)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_scores.softmax(-1) >= params.top_p   # keep the token that crosses top_p
            scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probabilities = scores.softmax(-1)
        tokens.append(int(torch.multinomial(probabilities, 1, generator=sequence.generator)))
    return tokens
