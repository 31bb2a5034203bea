"""The engine's weight matrices: fused projections, and weight-only int8 / int4 layers.

Decode multiplies one token per sequence by every weight matrix, so its speed is the speed at which weights
stream from memory, plus a fixed cost per call:
* `fuse_projections` makes q|k|v and gate|up one matrix each (fewer, larger calls);
* int8 (one scale per output channel, absmax / 127) halves the bytes of bf16, and PyTorch's CPU kernel
  `aten._weight_int8pack_mm` multiplies a few rows by it without dequantizing;
* int4 (groups of 32 input channels, each with a scale and zero point) quarters them, through
  `aten._weight_int4pack_mm_for_cpu`.
For many rows (prefill) those kernels are slower than a bf16 GEMM, so those calls dequantize the matrix and
run the GEMM: every token of a prompt and of an answer sees the same quantized weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_FORMATS = ("auto", "int8", "int4")  # auto: the weights as loaded (--dtype)
INT8_KERNEL_MAX_ROWS = 32  # up to here the int8 kernel beats dequantizing for a bf16 GEMM on CPU
INT4_KERNEL_MAX_ROWS = 256  # dequantizing int4 costs more: the kernel wins up to ~256-512 rows (CPU)
INT4_GROUP_SIZE = 32


class WeightOnlyLinear(nn.Module):
    """`nn.Linear` with quantized weights and activations in the model's dtype: up to `kernel_max_rows` rows
    (decode) go through PyTorch's CPU kernel for the format, more rows (prefill) or another device through a
    dequantized matrix and a GEMM."""

    kernel_max_rows: int

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` `[n, in]` -> `[n, out]` without dequantizing."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.kernel_max_rows or x.device.type != "cpu":
            return F.linear(x, self.dequantized_weight(), self.bias)
        output = self._kernel(x.reshape(rows, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return output if self.bias is None else output + self.bias


class Int8WeightOnlyLinear(WeightOnlyLinear):
    """int8 weights `[out, in]` and per-output-channel scales `[out]` (absmax / 127)."""

    kernel_max_rows = INT8_KERNEL_MAX_ROWS

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach()
        scales = weight.float().abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("weight_int8", (weight.float() / scales[:, None]).round().clamp(-127, 127)
                             .to(torch.int8))
        self.register_buffer("scales", scales.to(weight.dtype))

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(rows.to(self.scales.dtype), self.weight_int8, self.scales)


class Int4WeightOnlyLinear(WeightOnlyLinear):
    """4-bit weights: each output row in groups of `INT4_GROUP_SIZE` input channels, each group with a scale
    and zero point (min/max, asymmetric). Holds the kernel's packed layout for a few rows and a plain
    two-per-byte copy to dequantize for many: a byte per weight in memory, as int8, but half int8's bytes
    streamed per decode step."""

    kernel_max_rows = INT4_KERNEL_MAX_ROWS

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach()
        groups = weight.float().view(self.out_features, -1, INT4_GROUP_SIZE)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scales = ((high - low) / 15).clamp(min=1e-8)
        levels = ((groups - low) / scales).round().clamp(0, 15).to(torch.int32).view_as(weight)
        zeros = low + 8 * scales  # the kernel computes (level - 8) * scale + zero
        self.register_buffer("weight_int4pack", torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 2))
        self.register_buffer("weight_nibbles", (levels[:, ::2] | levels[:, 1::2] << 4).to(torch.uint8))
        scales_and_zeros = torch.cat([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [groups, out, 2]
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(weight.dtype))

    @staticmethod
    def supports(linear: nn.Linear) -> bool:
        return (linear.in_features % INT4_GROUP_SIZE == 0 and linear.out_features % 16 == 0
                and linear.weight.device.type == "cpu")

    def dequantized_weight(self) -> torch.Tensor:
        nibbles = self.weight_nibbles
        levels = torch.stack([nibbles & 15, nibbles >> 4], dim=-1).view(self.out_features, -1, INT4_GROUP_SIZE)
        scales, zeros = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # [out, groups] each
        weight = (levels.float() - 8) * scales[..., None] + zeros[..., None]
        return weight.view(self.out_features, self.in_features).to(self.scales_and_zeros.dtype)

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        output = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(self.scales_and_zeros.dtype),
                                                            self.weight_int4pack, INT4_GROUP_SIZE,
                                                            self.scales_and_zeros)
        return output.to(rows.dtype)


class RowSlice(nn.Module):
    """Output columns `[start, stop)` of a fused layer found at `parent.<name>`: what `q_proj`, `k_proj`, ...
    compute once `fuse_projections` has joined them, so the model still runs in transformers with one copy
    of its weights. Looked up at each call, so it follows the fused layer when it is quantized."""

    def __init__(self, parent: nn.Module, name: str, start: int, stop: int, in_features: int):
        super().__init__()
        self._parent = [parent]  # a plain list: not a submodule, so never saved or quantized twice
        self.name, self.start, self.stop = name, start, stop
        self.in_features, self.out_features = in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self._parent[0], self.name)(x)[..., self.start:self.stop]


FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fuse_projections(model: nn.Module) -> nn.Module:
    """In place: each decoder layer gets `self_attn.qkv_proj` and `mlp.gate_up_proj`, one matrix where the
    checkpoint has three or two (decode runs one matrix-vector product instead of five), and the parts
    become `RowSlice`s of them. Idempotent."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for fused_name, part_names in FUSED.items():
                parts = [getattr(parent, name, None) for name in part_names]
                if not all(type(part) is nn.Linear for part in parts):
                    continue
                setattr(parent, fused_name, _concatenate(parts))
                start = 0
                for name, part in zip(part_names, parts):
                    setattr(parent, name, RowSlice(parent, fused_name, start, start + part.out_features,
                                                   part.in_features))
                    start += part.out_features
    return model


def _concatenate(parts: list[nn.Linear]) -> nn.Linear:
    weight = torch.cat([part.weight.detach() for part in parts])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([part.bias.detach() for part in parts]), requires_grad=False)
    return fused


LINEAR_NAMES = ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj", "q_proj_swiftkv", "gate_up_proj",
                "gate_proj", "up_proj", "down_proj")


def quantize_weights(model: nn.Module, weights: str) -> nn.Module:
    """Replace, in place, every decoder layer's projections and `lm_head` by weight-only int8 or int4 layers
    (`weights="int8"` / `"int4"`; a matrix whose input width is not a multiple of the int4 group gets int8);
    `"auto"` leaves the model as it is. SingleInputKV's `k/v_proj_swiftkv` stay as they are: the engine stacks
    them into one matrix of its own."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if weights == "auto":
        return model

    def quantized(linear: nn.Linear) -> nn.Module:
        if weights == "int4" and Int4WeightOnlyLinear.supports(linear):
            return Int4WeightOnlyLinear(linear)
        return Int8WeightOnlyLinear(linear)

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEAR_NAMES:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, quantized(getattr(parent, name)))
    model.lm_head = quantized(model.lm_head)  # a tied lm_head gets its own quantized copy
    return model

