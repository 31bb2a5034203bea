"""Evaluation task files (the formats of `../shared/data/README.md`), validated line by line.

  multiple choice  {"id", "context", "choices": [str, ...], "label": int}   hellaswag, arc_easy, arc_challenge
  last word        {"text"}                                                lambada_openai
  raw text         a .txt file                                             wikitext2_test_raw
  prompts          {"id", "prompt"}                                        prompts_*.jsonl (fidelity)

A user adds a task by writing a JSONL file in one of these formats and passing its path to `--tasks`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from swiftkv.eval.data import data_file


class TaskFormatError(ValueError):
    """A task file line that does not fit its format; the message names the file and line."""


@dataclass(frozen=True)
class MultipleChoiceExample:
    id: str
    context: str
    choices: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class Task:
    name: str
    kind: str          # "multiple_choice", "last_word", "perplexity", "fidelity"
    path: Path


BUILTIN_TASKS = {
    "hellaswag": ("multiple_choice", "hellaswag.jsonl"),
    "arc_easy": ("multiple_choice", "arc_easy.jsonl"),
    "arc_challenge": ("multiple_choice", "arc_challenge.jsonl"),
    "lambada": ("last_word", "lambada_openai.jsonl"),
    "wikitext2": ("perplexity", "wikitext2_test_raw.txt"),
    "vicuna_bench": ("fidelity", "prompts_vicuna_bench.jsonl"),
    "alpaca_eval": ("fidelity", "prompts_alpaca_eval.jsonl"),
    "koala": ("fidelity", "prompts_koala.jsonl"),
    "self_instruct": ("fidelity", "prompts_self_instruct_user_oriented.jsonl"),
}


def resolve_task(spec: str) -> Task:
    """A built-in task name, or a path to a user file whose format is detected from its first line."""
    if spec in BUILTIN_TASKS:
        kind, file_name = BUILTIN_TASKS[spec]
        return Task(spec, kind, data_file(file_name))
    path = Path(spec)
    if not path.is_file():
        raise TaskFormatError(f"unknown task {spec!r}: not one of {sorted(BUILTIN_TASKS)} and not an existing file")
    if path.suffix == ".txt":
        return Task(path.stem, "perplexity", path)
    first = _json_lines(path)[:1]
    if not first:
        raise TaskFormatError(f"{path}: no records")
    record = first[0][1]
    kind = ("multiple_choice" if "choices" in record else "fidelity" if "prompt" in record
            else "last_word" if "text" in record else None)
    if kind is None:
        raise TaskFormatError(f"{path}:{first[0][0]}: cannot tell the task format from keys {sorted(record)}; "
                              "expected choices/context/label, prompt, or text")
    return Task(path.stem, kind, path)


def _json_lines(path: Path) -> list[tuple[int, dict]]:
    records = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TaskFormatError(f"{path}:{line_number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise TaskFormatError(f"{path}:{line_number}: expected a JSON object")
        records.append((line_number, record))
    return records


def _require(path: Path, line_number: int, record: dict, key: str, kind: type):
    if key not in record:
        raise TaskFormatError(f"{path}:{line_number}: missing field {key!r}")
    if not isinstance(record[key], kind):
        raise TaskFormatError(f"{path}:{line_number}: field {key!r} must be {kind.__name__}, "
                              f"got {type(record[key]).__name__}")
    return record[key]


def load_multiple_choice(path: Path, limit: int | None = None) -> list[MultipleChoiceExample]:
    examples = []
    for line_number, record in _json_lines(path)[:limit]:
        context = _require(path, line_number, record, "context", str)
        choices = _require(path, line_number, record, "choices", list)
        label = _require(path, line_number, record, "label", int)
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise TaskFormatError(f"{path}:{line_number}: 'choices' must be a list of at least two strings")
        if not 0 <= label < len(choices):
            raise TaskFormatError(f"{path}:{line_number}: label {label} is not an index into {len(choices)} choices")
        examples.append(MultipleChoiceExample(str(record.get("id", line_number)), context, tuple(choices), label))
    return examples


def load_last_word(path: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(context, " " + last word) pairs; the target is the last whitespace-separated word."""
    pairs = []
    for line_number, record in _json_lines(path)[:limit]:
        text = _require(path, line_number, record, "text", str).rstrip()
        context, _, word = text.rpartition(" ")
        if not context or not word:
            raise TaskFormatError(f"{path}:{line_number}: 'text' needs at least two words")
        pairs.append((context, " " + word))
    return pairs


def load_prompts(path: Path, limit: int | None = None) -> list[str]:
    return [_require(path, n, record, "prompt", str) for n, record in _json_lines(path)[:limit]]
