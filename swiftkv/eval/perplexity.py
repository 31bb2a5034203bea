"""Sliding-window perplexity on raw text: each token is predicted with up to `window` tokens of context,
and only the `stride` new tokens of each window are scored (the HF / lm-eval rolling method)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def window_negative_log_likelihoods(model, token_ids: torch.Tensor, window: int = 1024, stride: int = 512,
                                    max_windows: int | None = None) -> list[tuple[float, int]]:
    """(summed NLL, tokens scored) per window over the 1-D `token_ids`."""
    device = next(model.parameters()).device
    results, previous_end = [], 0
    starts = list(range(0, max(len(token_ids) - 1, 1), stride))[:max_windows]
    for start in tqdm(starts, desc="perplexity", leave=False):
        end = min(start + window, len(token_ids))
        new_tokens = end - previous_end
        if new_tokens <= 0:
            break
        input_ids = token_ids[start:end][None].to(device)
        logits = model(input_ids, use_cache=False).logits[0, :-1].float()
        targets = input_ids[0, 1:]
        scored = min(new_tokens, len(targets))
        nll = F.cross_entropy(logits[-scored:], targets[-scored:], reduction="sum")
        results.append((nll.item(), scored))
        previous_end = end
        if end == len(token_ids):
            break
    return results
