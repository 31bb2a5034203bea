"""Locating and reading the public evaluation sets (`../shared/data/`, or `$SWIFTKV_DATA_DIR`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

_REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """`$SWIFTKV_DATA_DIR` if set, else `shared/data` beside the repository checkout."""
    if os.environ.get("SWIFTKV_DATA_DIR"):
        return Path(os.environ["SWIFTKV_DATA_DIR"])
    for candidate in (_REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("evaluation data not found: set SWIFTKV_DATA_DIR to the folder holding "
                            "hellaswag.jsonl, wikitext2_test_raw.txt, ...")


def data_file(name: str) -> Path:
    """Path of `name` if it exists as given, else inside `data_dir()`."""
    if Path(name).is_file():
        return Path(name)
    path = data_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return path


def text_chunks(tokenizer, text: str, chunk_tokens: int, max_chunks: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping token windows of `text` (1-D LongTensors of `chunk_tokens`)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    chunks = [ids[start:start + chunk_tokens] for start in range(0, len(ids) - chunk_tokens + 1, chunk_tokens)]
    return chunks[:max_chunks]
