"""Run evaluation tasks on a model and on its baseline, side by side, with confidence intervals.

Per-example values are kept for every metric so differences get paired bootstrap intervals: a user can
tell noise from a real loss.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from swiftkv.eval.fidelity import token_kl_and_agreement
from swiftkv.eval.perplexity import window_negative_log_likelihoods
from swiftkv.eval.scoring import score_continuations
from swiftkv.eval.statistics import Estimate, bootstrap, paired_difference
from swiftkv.eval.tasks import Task, load_last_word, load_multiple_choice, load_prompts
from swiftkv.models.swiftkv import swiftkv_mode


@dataclass
class Candidate:
    """A model as evaluated: the module, and `swiftkv` on/off for a SwiftKV checkpoint (None = as loaded)."""

    name: str
    model: nn.Module
    swiftkv: Optional[bool] = None

    def active(self):
        return nullcontext() if self.swiftkv is None else swiftkv_mode(self.model, self.swiftkv)


@dataclass
class Metric:
    """Per-example values and how they aggregate (mean by default; e.g. exp of summed NLL / tokens)."""

    name: str
    values: list
    aggregate: Callable[[np.ndarray], float] = np.mean
    higher_is_better: bool = True


@dataclass
class TaskResult:
    task: str
    num_examples: int
    metrics: dict[str, Metric] = field(default_factory=dict)


def perplexity_aggregate(pairs: np.ndarray) -> float:
    """exp(total NLL / total tokens) over (nll, tokens) rows."""
    return float(np.exp(pairs[:, 0].sum() / pairs[:, 1].sum()))


def evaluate_likelihood_task(candidate: Candidate, tokenizer, task: Task, limit: Optional[int],
                             batch_size: int) -> TaskResult:
    with torch.no_grad(), candidate.active():
        model = candidate.model
        if task.kind == "multiple_choice":
            examples = load_multiple_choice(task.path, limit)
            pairs = [(ex.context, " " + choice) for ex in examples for choice in ex.choices]
            scores = iter(score_continuations(model, tokenizer, pairs, batch_size, desc=f"{task.name} {candidate.name}"))
            accuracy, normalized = [], []
            for example in examples:
                logprobs = np.array([next(scores).logprob for _ in example.choices])
                lengths = np.array([len((" " + c).encode()) for c in example.choices])
                accuracy.append(float(logprobs.argmax() == example.label))
                normalized.append(float((logprobs / lengths).argmax() == example.label))
            return TaskResult(task.name, len(examples), {"acc": Metric("acc", accuracy),
                                                         "acc_norm": Metric("acc_norm", normalized)})
        if task.kind == "last_word":
            pairs = load_last_word(task.path, limit)
            scores = score_continuations(model, tokenizer, pairs, batch_size, desc=f"{task.name} {candidate.name}")
            return TaskResult(task.name, len(pairs), {
                "acc": Metric("acc", [float(s.is_greedy) for s in scores]),
                "perplexity": Metric("perplexity", [(-s.logprob, 1) for s in scores], perplexity_aggregate, False),
            })
        if task.kind == "perplexity":
            token_ids = tokenizer(task.path.read_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
            windows = window_negative_log_likelihoods(model, token_ids, max_windows=limit)
            return TaskResult(task.name, len(windows), {
                "token_perplexity": Metric("token_perplexity", windows, perplexity_aggregate, False)})
    raise ValueError(f"task {task.name} of kind {task.kind!r} is not a likelihood task")


@torch.no_grad()
def _greedy(candidate: Candidate, encoded, max_new_tokens: int, pad_token_id: int) -> torch.Tensor:
    """The candidate's greedy answer tokens, on the CPU (its inputs go to the model's device)."""
    device = candidate.model.device
    with candidate.active():
        output = candidate.model.generate(input_ids=encoded.input_ids.to(device),
                                          attention_mask=encoded.attention_mask.to(device),
                                          max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=pad_token_id)
    return output[:, encoded.input_ids.shape[1]:].cpu()


def _logits(model, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    device = model.device
    return model(input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                 use_cache=False).logits.float().cpu()


def _trim(tokens: torch.Tensor, stop_ids: set[int]) -> list[int]:
    trimmed = []
    for token in tokens.tolist():
        trimmed.append(token)
        if token in stop_ids:
            break
    return trimmed


def evaluate_fidelity(candidate: Candidate, teacher: Candidate, tokenizer, task: Task, limit: Optional[int],
                      batch_size: int, max_new_tokens: int = 64) -> TaskResult:
    """Teacher fidelity on chat prompts: KL / top-1 agreement on the teacher's greedy answer, and whether
    the candidate's own greedy answer matches it (exact match, length of the common prefix)."""
    prompts = load_prompts(task.path, limit)
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    kl, agreement, exact, first_divergence = [], [], [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"{task.name} fidelity", leave=False):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in prompts[start:start + batch_size]]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        teacher_tokens = _greedy(teacher, encoded, max_new_tokens, tokenizer.pad_token_id)
        candidate_tokens = _greedy(candidate, encoded, max_new_tokens, tokenizer.pad_token_id)
        full = torch.cat([encoded.input_ids, teacher_tokens], dim=1)
        mask = torch.cat([encoded.attention_mask, torch.ones_like(teacher_tokens)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows
        with teacher.active():
            teacher_logits = _logits(teacher.model, full, mask, positions)
        with candidate.active():
            candidate_logits = _logits(candidate.model, full, mask, positions)
        prompt_length = encoded.input_ids.shape[1]
        token_kl, token_agreement = token_kl_and_agreement(teacher_logits[:, prompt_length - 1:-1],
                                                           candidate_logits[:, prompt_length - 1:-1])
        for row in range(len(texts)):
            reference = _trim(teacher_tokens[row], stop_ids)
            produced = _trim(candidate_tokens[row], stop_ids)
            n = len(reference)
            kl.append(token_kl[row, :n].mean().item())
            agreement.append(token_agreement[row, :n].mean().item())
            exact.append(float(reference == produced))
            common = next((i for i, (a, b) in enumerate(zip(reference, produced)) if a != b), min(n, len(produced)))
            first_divergence.append(float(common))
    return TaskResult(task.name, len(prompts), {
        "kl": Metric("kl", kl, higher_is_better=False),
        "top1_agreement": Metric("top1_agreement", agreement),
        "greedy_exact_match": Metric("greedy_exact_match", exact),
        "first_divergence_tokens": Metric("first_divergence_tokens", first_divergence),
    })


@dataclass
class ComparisonRow:
    task: str
    metric: str
    num_examples: int
    baseline: Optional[Estimate]
    model: Estimate
    difference: Optional[Estimate]
    higher_is_better: bool

    def as_dict(self) -> dict:
        return {"task": self.task, "metric": self.metric, "num_examples": self.num_examples,
                "baseline": self.baseline.as_dict() if self.baseline else None, "model": self.model.as_dict(),
                "difference": self.difference.as_dict() if self.difference else None,
                "higher_is_better": self.higher_is_better}


def compare(model: Candidate, baseline: Optional[Candidate], tokenizer, tasks: list[Task], limit: Optional[int],
            batch_size: int = 16, max_new_tokens: int = 64) -> list[ComparisonRow]:
    """Every task on model and baseline; fidelity tasks compare the model against the baseline (teacher)."""
    rows = []
    for task in tasks:
        if task.kind == "fidelity":
            if baseline is None:
                raise ValueError(f"task {task.name} measures fidelity to a baseline: pass --baseline")
            result = evaluate_fidelity(model, baseline, tokenizer, task, limit, batch_size, max_new_tokens)
            for metric in result.metrics.values():
                rows.append(ComparisonRow(task.name, metric.name, result.num_examples, None,
                                          bootstrap(metric.values, metric.aggregate), None, metric.higher_is_better))
            continue
        result = evaluate_likelihood_task(model, tokenizer, task, limit, batch_size)
        base_result = evaluate_likelihood_task(baseline, tokenizer, task, limit, batch_size) if baseline else None
        for name, metric in result.metrics.items():
            base_metric = base_result.metrics[name] if base_result else None
            rows.append(ComparisonRow(
                task.name, name, result.num_examples,
                bootstrap(base_metric.values, base_metric.aggregate) if base_metric else None,
                bootstrap(metric.values, metric.aggregate),
                paired_difference(metric.values, base_metric.values, metric.aggregate) if base_metric else None,
                metric.higher_is_better,
            ))
    return rows
