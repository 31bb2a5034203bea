"""Weight-only int8 linear layers: decode streams half the bytes of bf16 weights.

Decode multiplies one token per sequence by every weight matrix, so its speed is the speed at which weights
stream from memory. Stored as int8 with one scale per output channel (absmax / 127), a matrix is half its
bf16 size, and PyTorch's CPU kernel `aten._weight_int8pack_mm` multiplies a few rows by it without
dequantizing. For many rows (prefill) that kernel is slower than a bf16 GEMM, so those calls dequantize the
matrix and run the GEMM: every token of a prompt and of an answer sees the same int8 weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_FORMATS = ("auto", "int8")  # auto: the weights as loaded (--dtype)
INT8_KERNEL_MAX_ROWS = 32  # up to here the int8 kernel beats dequantizing for a bf16 GEMM on CPU


class Int8WeightOnlyLinear(nn.Module):
    """`nn.Linear` with int8 weights `[out, in]` and per-output-channel scales `[out]` (activations stay in
    the model's dtype)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scales = weight.float().abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("weight_int8", (weight.float() / scales[:, None]).round().clamp(-127, 127)
                             .to(torch.int8))
        self.register_buffer("scales", scales.to(weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > INT8_KERNEL_MAX_ROWS or x.device.type != "cpu":
            return F.linear(x, self.dequantized_weight(), self.bias)
        output = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, self.in_features).to(self.scales.dtype),
                                                    self.weight_int8, self.scales)
        output = output.reshape(*x.shape[:-1], self.out_features)
        return output if self.bias is None else output + self.bias


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "q_proj_swiftkv", "gate_proj", "up_proj", "down_proj")


def quantize_weights(model: nn.Module, weights: str) -> nn.Module:
    """Replace, in place, every decoder layer's projections and `lm_head` by int8 weight-only layers
    (`weights="int8"`); `"auto"` leaves the model as it is. SingleInputKV's `k/v_proj_swiftkv` stay as they
    are: the engine stacks them into one matrix of its own."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if weights == "auto":
        return model
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEAR_NAMES:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, Int8WeightOnlyLinear(getattr(parent, name)))
    model.lm_head = Int8WeightOnlyLinear(model.lm_head)  # a tied lm_head gets its own int8 copy
    return model
