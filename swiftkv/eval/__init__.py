"""Quality evaluation: a SwiftKV model side by side with its base model, with confidence intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

SAME_CHECKPOINT = "swiftkv-off"
DEFAULT_TASKS = ["hellaswag", "arc_easy", "arc_challenge", "lambada", "wikitext2", "vicuna_bench"]


def baseline_for(base_model: str, trainable: str) -> str:
    """What a build compares its result with: the same checkpoint with SwiftKV off, unless distillation trained
    the layers' own weights too (then only the base model itself is the base)."""
    from swiftkv.distill.config import keeps_base_model

    return SAME_CHECKPOINT if keeps_base_model(trainable) else base_model


def evaluate(model: str, tasks: list[str], baseline: Optional[str] = SAME_CHECKPOINT, limit: Optional[int] = None,
             batch_size: int = 16, dtype: str = "bfloat16", max_new_tokens: int = 64,
             out_dir: Optional[str | Path] = None, device: str = "auto"):
    """Evaluate `model` (and `baseline`: a model, `swiftkv-off` = the same checkpoint with SwiftKV off, or
    None) on `tasks`; print the table and write eval.json / eval.md to `out_dir`."""
    from swiftkv.eval.report import print_table, write_report
    from swiftkv.eval.runner import Candidate, compare
    from swiftkv.eval.tasks import resolve_task
    from swiftkv.loading import load_model, load_tokenizer

    resolved = [resolve_task(task) for task in tasks]
    tokenizer = load_tokenizer(model)
    loaded = load_model(model, dtype=dtype, device=device)
    is_swiftkv = hasattr(loaded.config, "swiftkv")
    candidate = Candidate("swiftkv" if is_swiftkv else "model", loaded, True if is_swiftkv else None)
    if baseline == SAME_CHECKPOINT:
        if not is_swiftkv:
            raise ValueError(f"--baseline {SAME_CHECKPOINT} needs a SwiftKV checkpoint; {model} is a base model")
        if not getattr(loaded.config, "swiftkv_base_preserved", True):
            raise ValueError(f"{model} was distilled with its layers' own weights training (trainable=upper_layers "
                             f"or all_layers), so with SwiftKV off it is not its base model any more; pass the "
                             f"base model as --baseline")
        reference = Candidate("base", loaded, False)
    elif baseline:
        reference = Candidate("base", load_model(baseline, dtype=dtype, device=device), None)
    else:
        reference = None
    rows = compare(candidate, reference, tokenizer, resolved, limit, batch_size, max_new_tokens)
    title = f"{model} vs {baseline or 'no baseline'}"
    print_table(rows, title)
    if out_dir is not None:
        settings = {"model": model, "baseline": baseline, "tasks": tasks, "limit": limit, "dtype": dtype,
                    "device": str(loaded.device),
                    "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                    "task_files": {task.name: str(task.path) for task in resolved}}  # which data was scored
        write_report(rows, out_dir, title, settings)
    return rows
