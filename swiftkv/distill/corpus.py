"""The offline default corpus: the teacher answers the built-in prompts once, and continues built-in openings
of raw text (no chat template) so the student keeps plain-text prediction too; on request it adds passages of
text people wrote (Python's own documentation, `documentation.py`), which the teacher scores like the rest.
All three are cached.

The cache key names the teacher (its config and a weight fingerprint), the prompts or openings, the decoding
settings and the round of answers, so a different teacher or setting never reuses stale text.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from swiftkv.distill.documentation import documentation_records
from swiftkv.distill.prompts import builtin_prompts, free_text_openings


def default_cache_dir() -> Path:
    return Path(os.environ.get("SWIFTKV_CACHE", Path.home() / ".cache" / "swiftkv"))


# Fields that do not change what the teacher writes: it runs with swiftkv off, and where a checkpoint was
# loaded from is not what it is. So conversions of one base model at any l / group size share one corpus.
IGNORED_CONFIG_FIELDS = ("swiftkv", "num_key_value_layers", "key_value_group_size", "_name_or_path")


def teacher_fingerprint(model) -> str:
    """Short hash of the teacher's config (less the SwiftKV fields) and a sample of its embedding weights."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in IGNORED_CONFIG_FIELDS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(model.get_input_embeddings().weight[:64].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def sample_continuations(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                         temperature: float, seed: int, desc: str) -> list[str]:
    """Teacher continuations of token-id prompts, sampled (top-p 0.95) with this project's engine: continuous
    batching of `batch_size` sequences, several times faster than `generate` on padded batches here. Request
    `i` is seeded with `seed + i`, so a text does not depend on which others ran beside it. `model` must be in
    teacher mode."""
    from swiftkv.engine import EngineConfig, LLMEngine, SamplingParams
    from swiftkv.engine.llm_engine import request_output

    engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_memory_gb=0.5, max_num_seqs=batch_size))
    sequences = [engine.add_request(prompt, SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                                           top_p=0.95 if temperature > 0 else 1.0, seed=seed + i))
                 for i, prompt in enumerate(prompts)]
    with tqdm(total=len(sequences), desc=desc, unit="text") as bar:
        while engine.has_unfinished():
            bar.update(sum(event.finished for event in engine.step()))
    return [request_output(sequence).text for sequence in sequences]


def generate_responses(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                       temperature: float, seed: int) -> list[str]:
    """The teacher's answers to chat prompts (through its chat template)."""
    chats = [list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True)) for prompt in prompts]
    answers = sample_continuations(model, tokenizer, chats, max_new_tokens, batch_size, temperature, seed,
                                   "teacher corpus")
    return [answer.strip() for answer in answers]


def _cached(cache_file: Path, make_records) -> list[dict]:
    """Records of a JSONL cache file, made (and written atomically) when it is missing."""
    if not cache_file.is_file():
        records = make_records()
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(".tmp")
        partial.write_text("".join(json.dumps(record) + "\n" for record in records))
        partial.replace(cache_file)
    return [json.loads(line) for line in cache_file.read_text().splitlines()]


def _key(settings: list) -> str:
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]


def teacher_corpus(model, tokenizer, num_prompts: int = 512, max_new_tokens: int = 192, samples_per_prompt: int = 1,
                   batch_size: int = 32, temperature: float = 0.7, seed: int = 0,
                   cache_dir: Path | None = None) -> list[dict]:
    """`{"prompt", "response"}` records: `samples_per_prompt` answers to each of the first `num_prompts`
    built-in prompts. Each round of answers is cached in its own file, so asking for more samples later
    generates only the new rounds."""
    prompts = builtin_prompts(seed)[:num_prompts]
    settings = [teacher_fingerprint(model), prompts, max_new_tokens, temperature, seed]
    records = []
    for sample in range(samples_per_prompt):  # round 0's key is the one-sample key, so old caches stay valid
        key = _key(settings + ([sample] if sample else []))
        cache_file = (cache_dir or default_cache_dir()) / f"teacher-corpus-{key}.jsonl"
        # Round r seeds request i with seed + i + r * len(prompts): no two answers share a seed.
        records += _cached(cache_file, lambda sample=sample: [
            {"prompt": p, "response": r} for p, r in zip(prompts, generate_responses(
                model, tokenizer, prompts, max_new_tokens, batch_size, temperature, seed + sample * len(prompts)))])
    return records


def free_text_corpus(model, tokenizer, num_texts: int, max_new_tokens: int = 192, batch_size: int = 32,
                     temperature: float = 0.7, seed: int = 0, cache_dir: Path | None = None) -> list[dict]:
    """`{"text"}` records: the teacher's continuations of the first `num_texts` built-in openings (opening +
    continuation, no chat template), cached like the chat corpus under their own key."""
    openings = free_text_openings(seed)
    openings = (openings * -(-num_texts // len(openings)))[:num_texts]  # more texts than openings: reseeded
    settings = ["free-text", teacher_fingerprint(model), openings, max_new_tokens, temperature, seed]
    cache_file = (cache_dir or default_cache_dir()) / f"teacher-free-text-{_key(settings)}.jsonl"

    def continue_openings() -> list[dict]:
        ids = [tokenizer(opening, add_special_tokens=False).input_ids for opening in openings]
        texts = sample_continuations(model, tokenizer, ids, max_new_tokens, batch_size, temperature, seed,
                                     "teacher free text")
        return [{"text": opening + text} for opening, text in zip(openings, texts)]

    return _cached(cache_file, continue_openings)


def documentation_corpus(num_words: int, seed: int = 0, cache_dir: Path | None = None) -> list[dict]:
    """`{"text"}` records: about `num_words` words of Python's documentation (`documentation_records`), cached
    under a key naming the Python version, since the passages come from its standard library."""
    if num_words <= 0:
        return []
    settings = ["python-documentation", sys.version, num_words, seed]
    cache_file = (cache_dir or default_cache_dir()) / f"documentation-{_key(settings)}.jsonl"
    return _cached(cache_file, lambda: documentation_records(num_words, seed))
