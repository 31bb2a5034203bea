"""The offline default corpus: the teacher answers the built-in prompts once; the answers are cached.

The cache key names the teacher (its config and a weight fingerprint), the prompts and the decoding
settings, so a different teacher or setting never reuses stale text.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from swiftkv.distill.prompts import builtin_prompts


def default_cache_dir() -> Path:
    return Path(os.environ.get("SWIFTKV_CACHE", Path.home() / ".cache" / "swiftkv"))


def teacher_fingerprint(model) -> str:
    """Short hash of the teacher's config and a sample of its embedding weights."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    digest.update(model.get_input_embeddings().weight[:64].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                       temperature: float, seed: int) -> list[str]:
    """Teacher answers (sampled, left-padded batches); `model` must already be in teacher mode."""
    torch.manual_seed(seed)
    responses = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="teacher corpus", unit="batch"):
        batch = prompts[start:start + batch_size]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in batch]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        output = model.generate(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask,
                                max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                temperature=temperature if temperature > 0 else None, top_p=0.95 if temperature > 0 else None,
                                pad_token_id=tokenizer.pad_token_id)
        for row in output[:, encoded.input_ids.shape[1]:]:
            responses.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return responses


def teacher_corpus(model, tokenizer, num_prompts: int = 512, max_new_tokens: int = 192, batch_size: int = 32,
                   temperature: float = 0.7, seed: int = 0, cache_dir: Path | None = None) -> list[dict]:
    """`{"prompt", "response"}` records for the first `num_prompts` built-in prompts, generated once."""
    prompts = builtin_prompts(seed)[:num_prompts]
    key = hashlib.sha256(json.dumps([teacher_fingerprint(model), prompts, max_new_tokens, temperature, seed])
                         .encode()).hexdigest()[:16]
    cache_file = (cache_dir or default_cache_dir()) / f"teacher-corpus-{key}.jsonl"
    if cache_file.is_file():
        return [json.loads(line) for line in cache_file.read_text().splitlines()]
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, seed)
    records = [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(".tmp")
    partial.write_text("".join(json.dumps(r) + "\n" for r in records))
    partial.replace(cache_file)
    return records
