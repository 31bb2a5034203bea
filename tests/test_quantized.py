"""The engine's weight matrices: fused projections compute what the parts did with one copy of the weights;
weight-only int8 and int4 layers stay close to the full-precision layer on both of their kernels, and the
engine built on them still equals transformers running the same quantized model, token for token."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swiftkv.checkpoint import CheckpointError, save_checkpoint
from swiftkv.engine.quantized import (INT4_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS, Int4WeightOnlyLinear,
                                     Int8WeightOnlyLinear, RowSlice, fuse_projections, quantize_weights)

from conftest import make_base_model
from test_engine import GREEDY, engine_for, hf_greedy, prompts, run, swiftkv_model


# (layer, rows up to which its own kernel runs, largest error / output spread), over ~10k outputs: per-channel
# absmax int8 keeps ~7 bits (plus bf16 rounding); int4 has 16 levels per group of 32 uniform weights, ~7% noise per
# weight
QUANTIZED_LAYERS = [(Int8WeightOnlyLinear, INT8_KERNEL_MAX_ROWS, 0.05), (Int4WeightOnlyLinear, INT4_KERNEL_MAX_ROWS, 0.3)]


@pytest.mark.parametrize("layer_class, kernel_rows, tolerance", QUANTIZED_LAYERS, ids=["int8", "int4"])
@pytest.mark.parametrize("rows", ["one", "kernel_rows", 40])  # the kernel, its largest batch, dequantize + GEMM
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_linear_is_within_quantization_error_of_the_full_precision_layer(layer_class, kernel_rows,
                                                                                   tolerance, rows, bias):
    torch.manual_seed(0)
    rows = {"one": 1, "kernel_rows": kernel_rows}.get(rows, rows)
    linear = nn.Linear(64, 128, bias=bias).to(torch.bfloat16)
    x = torch.randn(2, rows, 64, dtype=torch.bfloat16)
    expected, quantized = linear(x).float(), layer_class(linear)(x).float()
    assert quantized.shape == expected.shape
    assert 0 < (quantized - expected).abs().max() < tolerance * expected.std()


@pytest.mark.parametrize("layer_class, kernel_rows, tolerance", QUANTIZED_LAYERS, ids=["int8", "int4"])
def test_both_kernels_compute_the_same_quantized_product(layer_class, kernel_rows, tolerance):
    torch.manual_seed(0)
    layer = layer_class(nn.Linear(64, 128).to(torch.bfloat16))
    x = torch.randn(kernel_rows + 1, 64, dtype=torch.bfloat16)
    few_rows = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(few_rows.float(), layer(x).float(), atol=0.05, rtol=0.02)


def test_int4_falls_back_to_int8_for_shapes_its_kernel_does_not_take():
    assert not Int4WeightOnlyLinear.supports(nn.Linear(48, 16))  # input width: not whole groups of 32
    assert not Int4WeightOnlyLinear.supports(nn.Linear(64, 24))  # output width: the kernel packs 16 rows
    model = quantize_weights(make_base_model("llama", vocab_size=100), "int4")
    assert isinstance(model.model.layers[0].self_attn.o_proj, Int4WeightOnlyLinear)
    assert isinstance(model.lm_head, Int8WeightOnlyLinear)


def test_fused_projections_compute_what_the_parts_did_with_one_copy_of_the_weights():
    model = swiftkv_model()
    input_ids = torch.tensor([prompts(1)[0]])
    parameters = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        expected = model(input_ids).logits
        fuse_projections(fuse_projections(model))  # idempotent
        fused = model(input_ids).logits
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert all(isinstance(getattr(attention, name), RowSlice) for name in ("q_proj", "k_proj", "v_proj"))
    assert all(isinstance(getattr(mlp, name), RowSlice) for name in ("gate_proj", "up_proj"))
    assert attention.qkv_proj.out_features == attention.q_proj.out_features + 2 * attention.k_proj.out_features
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert torch.allclose(fused, expected, atol=1e-5, rtol=1e-5)


def test_a_model_prepared_for_the_engine_is_not_saved_as_a_checkpoint(tmp_path):
    model = swiftkv_model()
    engine_for(model, weights="int8")  # fuses and quantizes in place
    with pytest.raises(CheckpointError, match="save it before building an engine"):
        save_checkpoint(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quantizing_a_fused_model_quantizes_the_fused_matrices_and_the_parts_follow():
    model = quantize_weights(fuse_projections(swiftkv_model()), "int8")
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.qkv_proj, Int8WeightOnlyLinear)
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, Int8WeightOnlyLinear)
    x = torch.randn(1, 3, model.config.hidden_size)
    assert torch.equal(attention.k_proj(x), attention.qkv_proj(x)[..., attention.k_proj.start:attention.k_proj.stop])


def test_quantize_weights_replaces_projections_and_lm_head_but_not_the_single_input_kv():
    model = quantize_weights(swiftkv_model(), "int8")
    attention = model.model.layers[-1].self_attn
    assert isinstance(attention.q_proj_swiftkv, Int8WeightOnlyLinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8WeightOnlyLinear)
    assert isinstance(model.lm_head, Int8WeightOnlyLinear)
    assert isinstance(model.model.layers[2].self_attn.k_proj_swiftkv, nn.Linear)


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("make_model", [lambda: make_base_model("llama"), swiftkv_model], ids=["base", "swiftkv"])
def test_quantized_engine_equals_transformers_on_the_same_quantized_model(make_model, weights):
    model = make_model()  # float32 activations, as in test_engine's equality tests: bf16 ties flip argmaxes
    engine = engine_for(model, weights=weights)  # fuses and quantizes `model` in place
    outputs = run(engine, prompts(), GREEDY)
    for prompt, output in zip(prompts(), outputs):
        assert output.token_ids == hf_greedy(model, prompt, 10)


@pytest.mark.parametrize("weights, tolerance, agreement", [("int8", 0.01, 0.9), ("int4", 0.15, 0.75)])
def test_quantized_logits_stay_close_to_bf16(weights, tolerance, agreement):
    model = swiftkv_model().to(torch.bfloat16)
    input_ids = torch.tensor([prompts(1)[0]])
    with torch.no_grad():
        full = model(input_ids).logits.float()
        quantized = quantize_weights(model, weights)(input_ids).logits.float()
    assert (quantized - full).abs().mean() < tolerance * full.std()
    assert (quantized.argmax(-1) == full.argmax(-1)).float().mean() > agreement


def test_unknown_weight_format_is_named():
    with pytest.raises(ValueError, match="weights must be one of \\('auto', 'int8', 'int4'\\), got 'int3'"):
        quantize_weights(swiftkv_model(), "int3")
