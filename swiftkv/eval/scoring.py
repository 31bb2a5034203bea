"""Batched log-likelihood scoring of (context, continuation) pairs, the core of every likelihood task.

Each pair is tokenized as `context + continuation` (continuation tokens = those after the context's
tokens, as lm-eval does), pairs are sorted by length to keep padding small, and one full forward per
batch gives the continuation's summed log-probability and whether greedy decoding reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class ContinuationScore:
    logprob: float          # sum of log p(continuation tokens | context)
    is_greedy: bool         # every continuation token is the argmax
    num_tokens: int


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of context+continuation and how many trailing ids are the continuation."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    whole_ids = tokenizer(context + continuation, add_special_tokens=False).input_ids
    shared = 0
    while shared < min(len(context_ids), len(whole_ids)) and context_ids[shared] == whole_ids[shared]:
        shared += 1
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not context_ids else []
    return bos + whole_ids, len(whole_ids) - shared


@torch.no_grad()
def score_continuations(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16,
                        max_length: int | None = None, desc: str = "scoring") -> list[ContinuationScore]:
    """Score every pair; long inputs keep their last `max_length` tokens (the continuation always fits)."""
    max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
    encoded = []
    for context, continuation in pairs:
        ids, num_continuation = encode_pair(tokenizer, context, continuation)
        if num_continuation == 0:
            raise ValueError(f"continuation {continuation!r} produced no tokens after context {context[-40:]!r}")
        encoded.append((ids[-max_length:], min(num_continuation, max_length - 1)))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    scores: list[ContinuationScore | None] = [None] * len(encoded)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        batch = [encoded[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (ids, _) in enumerate(batch):  # right padding: positions stay 0..n-1 for every row
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        logits = model(input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
        logprobs = F.log_softmax(logits.float(), dim=-1)
        for row, (ids, num_continuation) in enumerate(batch):
            targets = torch.tensor(ids[len(ids) - num_continuation:], device=device)
            predicted = logprobs[row, len(ids) - num_continuation - 1:len(ids) - 1]
            token_logprobs = predicted.gather(-1, targets[:, None]).squeeze(-1)
            scores[order[start + row]] = ContinuationScore(token_logprobs.sum().item(),
                                                           bool((predicted.argmax(-1) == targets).all()),
                                                           num_continuation)
    return scores
