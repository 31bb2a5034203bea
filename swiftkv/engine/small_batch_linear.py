"""bf16 projections of a few rows (decode steps) through our own CPU kernel, csrc/small_batch_linear_cpu.cpp.

A decode step multiplies one row per running sequence by every weight matrix, so its matrix products should run
at the speed weights stream from memory. On a CPU with AVX512-BF16, oneDNN's bf16 GEMM reaches a third to a half
of that at 1-16 rows and ATen's GEMV most of it at one row only; the kernel reads the weights as stored,
prefetches the next rows while it multiplies, and stays ahead of both up to about 100 rows
(benchmarks/small_batch_linear.py: SmolLM2's 30 layers + lm_head at 16 rows, 16.3 -> 10.9 ms). One row goes to
ATen's GEMV, more than 64 (prompt chunks) to oneDNN, which is faster once the products are compute-bound.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from swiftkv.engine import paged_attention_cpu

# the kernel from 2 to 64 rows (benchmarks/small_batch_linear.json); one row to F.linear: ATen's GEMV where the
# engine switches oneDNN off for one-row steps (the kernel is no faster there); more rows to oneDNN
MIN_ROWS, MAX_ROWS = 2, 64
DISABLE_VARIABLE = "SWIFTKV_CPU_LINEAR_KERNEL"  # "0": engines built from then on keep PyTorch's products


def available() -> bool:
    """Whether this CPU runs the kernel (AVX512-BF16; built with the attention kernels on first call) and it is
    not switched off (SWIFTKV_CPU_LINEAR_KERNEL=0)."""
    return os.environ.get(DISABLE_VARIABLE, "1") != "0" and _built()


@functools.lru_cache(maxsize=None)
def _built() -> bool:
    return paged_attention_cpu.built() and torch.ops.swiftkv_cpu.small_batch_linear_is_fast()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for bf16 on a CPU, through the kernel when `x` has MIN_ROWS to MAX_ROWS rows;
    call only where `supports(weight)`."""
    rows = x.numel() // weight.shape[1]
    if not MIN_ROWS <= rows <= MAX_ROWS or x.device.type != "cpu":  # e.g. a swapped model moved to a GPU since
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, weight.shape[1])
    output = torch.ops.swiftkv_cpu.small_batch_linear(flat if flat.stride(-1) == 1 else flat.contiguous(), weight,
                                                      bias)
    return output.reshape(*x.shape[:-1], weight.shape[0])


def supports(weight: torch.Tensor) -> bool:
    """Whether the kernel takes this weight `[out, in]`: bf16 on a CPU, contiguous, in % 32 == 0, out % 16 == 0."""
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.is_contiguous()
            and weight.dim() == 2 and weight.shape[1] % 32 == 0 and weight.shape[0] % 16 == 0)


class SmallBatchLinear(nn.Linear):
    """`nn.Linear` whose products of a few rows run through the kernel (`linear`) when no gradient is wanted."""

    @classmethod
    def sharing(cls, source: nn.Linear) -> "SmallBatchLinear":
        """A SmallBatchLinear holding `source`'s own parameters (no copy; a tied weight stays tied)."""
        module = cls(source.in_features, source.out_features, bias=source.bias is not None, device="meta")
        module.weight, module.bias = source.weight, source.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)  # the kernel has no backward
        return linear(x, self.weight, self.bias)


def use_small_batch_linear(model: nn.Module) -> nn.Module:
    """In place: every `nn.Linear` of `model` whose weight the kernel takes becomes a `SmallBatchLinear` sharing
    its parameters; a no-op where the CPU has no AVX512-BF16. Idempotent."""
    if not available():
        return model
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear and supports(child.weight) and \
                    (child.bias is None or child.bias.dtype == torch.bfloat16):
                setattr(parent, name, SmallBatchLinear.sharing(child))
    return model
