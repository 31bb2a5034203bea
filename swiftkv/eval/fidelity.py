"""Fidelity of a SwiftKV model to its teacher (the base model): per-token KL and top-1 agreement.

The teacher is a separate base model, or the same SwiftKV checkpoint run with `swiftkv = False`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from swiftkv.models.swiftkv import swiftkv_mode


@dataclass
class Fidelity:
    """Token-weighted means over all scored positions, plus per-sequence values for confidence intervals."""

    kl: float
    top1_agreement: float
    num_tokens: int
    per_sequence_kl: list[float]
    per_sequence_agreement: list[float]

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("per_sequence")}


def token_kl_and_agreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                           temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) and argmax agreement per position; logits `[..., vocab]` -> `[...]`."""
    teacher_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    agreement = (teacher_logits.argmax(-1) == student_logits.argmax(-1)).float()
    return kl, agreement


def _teacher_context(student: nn.Module, teacher: Optional[nn.Module]):
    return swiftkv_mode(student, enabled=False) if teacher is None else nullcontext()


@torch.no_grad()
def measure_fidelity(student: nn.Module, sequences: Iterable[torch.Tensor], teacher: Optional[nn.Module] = None,
                     progress: bool = False, autocast_dtype: Optional[torch.dtype] = None) -> Fidelity:
    """Score each token sequence (1-D LongTensor) with teacher and student; `teacher=None` = student off.
    `autocast_dtype` runs both under autocast, as the distillation trainer evaluates."""
    from tqdm.auto import tqdm

    per_kl, per_agreement, total_kl, total_agree, total_tokens = [], [], 0.0, 0.0, 0
    sequences = list(sequences)
    autocast = torch.autocast(student.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    for input_ids in tqdm(sequences, desc="fidelity", disable=not progress):
        input_ids = input_ids.to(student.device)[None]
        with autocast, _teacher_context(student, teacher):
            teacher_logits = (teacher or student)(input_ids, use_cache=False).logits
        with autocast:
            student_logits = student(input_ids, use_cache=False).logits
        kl, agreement = token_kl_and_agreement(teacher_logits, student_logits)
        per_kl.append(kl.mean().item())
        per_agreement.append(agreement.mean().item())
        total_kl += kl.sum().item()
        total_agree += agreement.sum().item()
        total_tokens += kl.numel()
    if total_tokens == 0:
        raise ValueError("no tokens to score: every sequence was empty")
    return Fidelity(total_kl / total_tokens, total_agree / total_tokens, total_tokens, per_kl, per_agreement)
