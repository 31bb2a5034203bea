"""No evaluation text in training: records that share a 13-word sequence with any evaluation set are dropped.

The evaluation sets are every file in the data folder (`swiftkv.eval.data.data_dir`: the multiple-choice
tasks, LAMBADA, WikiText-2 and the fidelity prompts). A shared run of 13 words is the usual test for
contamination (GPT-3's): long enough that ordinary phrases do not trigger it, short enough to catch a copied
sentence, including one the teacher reproduces from memory. Texts shorter than 13 words cannot match.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

NGRAM_WORDS = 13
_WORD = re.compile(r"[a-z0-9]+")


def _ngrams(text: str) -> set[int]:
    words = _WORD.findall(text.lower())
    return {hash(tuple(words[i:i + NGRAM_WORDS])) for i in range(len(words) - NGRAM_WORDS + 1)}


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def _file_texts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return [" ".join(_strings(json.loads(line))) for line in path.read_text().splitlines() if line.strip()]
    return [path.read_text()] if path.suffix == ".txt" else []


@lru_cache(maxsize=4)
def evaluation_ngrams(folder: Path) -> dict[int, str]:
    """Hashed 13-word sequences of every evaluation file in `folder` -> the file's name."""
    ngrams: dict[int, str] = {}
    for path in sorted(folder.iterdir()):
        for text in _file_texts(path):
            ngrams.update(dict.fromkeys(_ngrams(text), path.name))
    return ngrams


def drop_evaluation_text(records: list[dict], folder: Path | None = None) -> tuple[list[dict], dict[str, int]]:
    """`records` less those sharing a 13-word sequence with an evaluation set, and how many each set caught.
    Without the data folder there is nothing to compare with and every record is kept."""
    from swiftkv.distill.data import record_messages

    if folder is None:
        from swiftkv.eval.data import data_dir

        try:
            folder = data_dir()
        except FileNotFoundError:
            return records, {}
    ngrams = evaluation_ngrams(Path(folder))
    kept, caught = [], {}
    for record in records:
        messages = record_messages(record)
        text = " ".join(m["content"] for m in messages) if messages else record["text"]
        hits = _ngrams(text) & ngrams.keys()
        if hits:
            name = ngrams[next(iter(hits))]
            caught[name] = caught.get(name, 0) + 1
        else:
            kept.append(record)
    return kept, caught
