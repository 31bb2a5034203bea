"""Knowledge-preserving distillation losses (SwiftKV reference: KL at temperature 2, optional hidden MSE).

The logits KL over a 49k-token vocabulary is memory-bound on a CPU; `torch.compile` fuses it into a
couple of passes, with an eager fallback where no compiler is available.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def _kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    vocab = student_logits.shape[-1]
    student_logp = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()
    return kl * temperature**2


class _CompiledWithFallback:
    """`torch.compile(fn)`, or `fn` itself once compiling fails (or `SWIFTKV_NO_COMPILE=1`)."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = None if os.environ.get("SWIFTKV_NO_COMPILE") == "1" else torch.compile(fn)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as error:  # compiler missing or unsupported backend: stay correct, lose speed
                logger.warning("torch.compile of %s failed (%s); using eager", self.fn.__name__, error)
                self.compiled = None
        return self.fn(*args)


_compiled_kl = _CompiledWithFallback(_kl_teacher_student)


def logits_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             temperature: float) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on `logits / T`, times T^2 (gradient scale kept).

    Logits `[..., vocab]`; the teacher's carry no gradient.
    """
    return _compiled_kl(student_logits, teacher_logits.detach(), temperature)


def hidden_state_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """MSE of hidden states `[..., hidden]` with each channel divided by the teacher's RMS over the batch.

    Residual streams carry a few outlier channels far larger than the rest; a plain MSE would train
    almost only those. Per-channel scaling weighs every channel equally (1.0 = as far off as the signal).
    """
    teacher = teacher_hidden.detach().float().reshape(-1, teacher_hidden.shape[-1])
    student = student_hidden.float().reshape(-1, student_hidden.shape[-1])
    channel_rms = teacher.pow(2).mean(0).sqrt().clamp_min(1e-6)
    return ((student - teacher) / channel_rms).pow(2).mean()
