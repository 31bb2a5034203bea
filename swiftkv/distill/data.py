"""Distillation data: records from files, Hugging Face datasets or the teacher-generated default corpus,
formatted with the chat template and packed into fixed-length token blocks (no padding wasted).

Record shapes accepted (JSONL / JSON list / parquet rows / dataset rows):
  {"messages": [{"role": ..., "content": ...}, ...]}     chat
  {"prompt": ..., "response" | "completion" | "output": ...}   instruction + answer
  {"prompt": ...} or {"instruction": ...}                  prompt only
  {"text": ...}                                            raw text
A `.txt` file is raw text, one document per block between blank lines (lines of only spaces or tabs count
as blank).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch


class DataError(ValueError):
    """Unusable training data; the message names the file, the line and the fix."""


RESPONSE_KEYS = ("response", "completion", "output", "answer")
PROMPT_KEYS = ("prompt", "instruction", "question")


def read_records(path: str | Path) -> list[dict]:
    """Records of a local `.jsonl`, `.json`, `.parquet` or `.txt` file (clear error naming the line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        blocks = [block.strip() for block in re.split(r"\n[ \t\r\f\v]*\n", path.read_text())]
        return [{"text": block} for block in blocks if block]
    if suffix == ".jsonl":
        records = []
        for line_number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg})") from error
        return [_checked(record, f"{path}:{number}") for number, record in enumerate(records, start=1)]
    if suffix == ".json":
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        return [_checked(record, f"{path}[{index}]") for index, record in enumerate(records)]
    if suffix == ".parquet":
        from datasets import Dataset

        return [_checked(dict(row), f"{path} row {i}") for i, row in enumerate(Dataset.from_parquet(str(path)))]
    raise DataError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json, .parquet or .txt")


def _checked(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if not ({"messages", "text"} | set(PROMPT_KEYS)) & record.keys():
        raise DataError(f"{where}: a record needs 'messages', 'text' or 'prompt' (found keys {sorted(record)})")
    return record


def load_dataset_records(name: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """Rows of a Hugging Face dataset (needs network unless it is in the local datasets cache)."""
    from datasets import load_dataset

    dataset = load_dataset(name, split=split)
    rows = dataset if limit is None else dataset.select(range(min(limit, len(dataset))))
    return [_checked(dict(row), f"{name}[{i}]") for i, row in enumerate(rows)]


def record_messages(record: dict) -> list[dict] | None:
    """The record as chat messages, or None for raw text."""
    if "messages" in record:
        return record["messages"]
    prompt = next((record[k] for k in PROMPT_KEYS if k in record), None)
    if prompt is None:
        return None
    if record.get("input"):
        prompt = f"{prompt}\n\n{record['input']}"
    messages = [{"role": "user", "content": prompt}]
    response = next((record[k] for k in RESPONSE_KEYS if record.get(k)), None)
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def encode_record(record: dict, tokenizer) -> list[int]:
    """Token ids of one record: chat records through the model's chat template, text as it is."""
    messages = record_messages(record)
    if messages is None:
        return tokenizer(record["text"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    if tokenizer.chat_template is None:
        text = "\n\n".join(m["content"] for m in messages)
        return tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    add_generation_prompt = messages[-1]["role"] != "assistant"
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt))


def pack_sequences(sequences: list[list[int]], block_length: int) -> torch.Tensor:
    """Concatenate token sequences and cut them into `[num_blocks, block_length]` (the tail is dropped)."""
    flat = [token for sequence in sequences for token in sequence]
    num_blocks = len(flat) // block_length
    if num_blocks == 0:
        raise DataError(f"only {len(flat)} tokens of data: fewer than one block of {block_length}; "
                        "add data or lower --seq-length")
    return torch.tensor(flat[: num_blocks * block_length], dtype=torch.long).view(num_blocks, block_length)


def record_prompt(record: dict) -> str:
    """What identifies a record for the held-out split: its first message (the prompt), or its text."""
    messages = record_messages(record)
    return messages[0]["content"] if messages else record["text"]


def _unit_hash(text: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_records(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Train / held-out split by a seeded hash of each record's prompt.

    A record's side depends only on its own prompt, never on which other records are present: a larger
    corpus keeps the smaller one's held-out prompts held out, and answers to one prompt stay together.
    At least one record is held out when `eval_fraction > 0` (the one with the smallest hash).
    """
    if not records:
        raise DataError("no training records")
    scores = [_unit_hash(record_prompt(record), seed) for record in records]
    held_out = {i for i, score in enumerate(scores) if score < eval_fraction}
    if eval_fraction > 0 and not held_out:
        smallest = min(scores)
        held_out = {i for i, score in enumerate(scores) if score == smallest}
    train = [record for i, record in enumerate(records) if i not in held_out]
    if not train:
        raise DataError(f"all {len(records)} records were held out; lower eval_fraction ({eval_fraction})")
    return train, [records[i] for i in sorted(held_out)]


def train_eval_blocks(records: list[dict], tokenizer, block_length: int, eval_fraction: float,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed blocks of `split_records`: `[n_train, block_length]`, `[n_eval, block_length]`."""
    train_records, eval_records = split_records(records, eval_fraction, seed)
    eval_blocks = (pack_sequences([encode_record(r, tokenizer) for r in eval_records], block_length)
                   if eval_records else torch.empty(0, block_length))
    return pack_sequences([encode_record(r, tokenizer) for r in train_records], block_length), eval_blocks
