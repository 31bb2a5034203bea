"""Next-token choice per sequence: greedy, or temperature with top-k / top-p, optionally seeded; and the
log-probabilities a request asked for."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swiftkv.engine.sequence import Sequence


NUCLEUS_CANDIDATES = 256  # top-p looks here first instead of sorting the whole vocabulary (benchmarks/corpus.py)


@dataclass
class TokenLogprobs:
    """The sampled token's log-probability under the model (before temperature, top-k and top-p, as vLLM
    reports it) and the `k` most likely tokens with theirs."""

    logprob: float
    top: list[tuple[int, float]]


def nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Ids of the tokens top-p keeps: the most likely ones whose mass first reaches `top_p` (the token that
    crosses it included), most likely first. Sorts the whole vocabulary only when the top candidates hold
    less than `top_p`."""
    probabilities = scores.softmax(-1)
    top, order = probabilities.topk(min(NUCLEUS_CANDIDATES, scores.numel()))
    if len(top) < scores.numel() and top.sum() < top_p:
        top, order = probabilities.sort(descending=True)
    keep = top.cumsum(-1) - top < top_p
    keep[0] = True  # the most likely token always: a top_p that rounds to 0 in float32 (1e-320) keeps it
    return order[keep]


def sample(logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
    """logits `[batch, vocab]` (float32) -> one token id per sequence."""
    tokens = []
    greedy = logits.argmax(-1).tolist()
    for row, sequence in enumerate(sequences):
        params = sequence.params
        if params.greedy:
            tokens.append(greedy[row])
            continue
        scores = logits[row].cpu() / params.temperature  # the seeded generator is a CPU one, on any device
        if params.top_k:
            kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        candidates = nucleus(scores, params.top_p) if params.top_p < 1 else None
        if candidates is not None:  # draw among the nucleus only, not over the whole vocabulary
            scores = scores[candidates]
        choice = int(torch.multinomial(scores.softmax(-1), 1, generator=sequence.generator))
        tokens.append(int(candidates[choice]) if candidates is not None else choice)
    return tokens


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    """logits `[vocab]` of one row -> `token`'s log-probability and the top `k`."""
    logprobs = torch.log_softmax(logits.float(), -1)
    values, ids = logprobs.topk(k) if k else (logprobs[:0], logprobs[:0].long())
    return TokenLogprobs(float(logprobs[token]), list(zip(ids.tolist(), values.tolist())))
