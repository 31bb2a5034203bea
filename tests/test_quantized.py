"""Weight-only int8 layers: close to the full-precision layer on both kernels, and the engine built on them
still equals transformers running the same quantized model, token for token."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swiftkv.engine.quantized import INT8_KERNEL_MAX_ROWS, Int8WeightOnlyLinear, quantize_weights

from conftest import make_base_model
from test_engine import GREEDY, engine_for, hf_greedy, prompts, run, swiftkv_model


@pytest.mark.parametrize("rows", [1, INT8_KERNEL_MAX_ROWS, 40])  # the int8 kernel, and dequantize + GEMM
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_within_quantization_error_of_the_full_precision_layer(rows, bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=bias).to(torch.bfloat16)
    x = torch.randn(2, rows, 64, dtype=torch.bfloat16)
    expected, quantized = linear(x).float(), Int8WeightOnlyLinear(linear)(x).float()
    assert quantized.shape == expected.shape
    # per-channel absmax int8 keeps ~7 bits: the error is a small fraction of the output's spread
    assert (quantized - expected).abs().max() < 0.03 * expected.std()


def test_both_kernels_compute_the_same_int8_product():
    torch.manual_seed(0)
    layer = Int8WeightOnlyLinear(nn.Linear(64, 48).to(torch.bfloat16))
    x = torch.randn(INT8_KERNEL_MAX_ROWS + 1, 64, dtype=torch.bfloat16)
    few_rows = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(few_rows.float(), layer(x).float(), atol=0.05, rtol=0.02)


def test_quantize_weights_replaces_projections_and_lm_head_but_not_the_single_input_kv():
    model = quantize_weights(swiftkv_model(), "int8")
    attention = model.model.layers[-1].self_attn
    assert isinstance(attention.q_proj_swiftkv, Int8WeightOnlyLinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8WeightOnlyLinear)
    assert isinstance(model.lm_head, Int8WeightOnlyLinear)
    assert isinstance(model.model.layers[2].self_attn.k_proj_swiftkv, nn.Linear)


@pytest.mark.parametrize("make_model", [lambda: make_base_model("llama"), swiftkv_model], ids=["base", "swiftkv"])
def test_int8_engine_equals_transformers_on_the_same_quantized_model(make_model):
    model = make_model()  # float32 activations, as in test_engine's equality tests: bf16 ties flip argmaxes
    engine = engine_for(model, weights="int8")  # quantizes `model` in place
    outputs = run(engine, prompts(), GREEDY)
    for prompt, output in zip(prompts(), outputs):
        assert output.token_ids == hf_greedy(model, prompt, 10)


def test_int8_logits_stay_close_to_bf16():
    model = swiftkv_model().to(torch.bfloat16)
    input_ids = torch.tensor([prompts(1)[0]])
    with torch.no_grad():
        full = model(input_ids).logits.float()
        quantized = quantize_weights(model, "int8")(input_ids).logits.float()
    assert (quantized - full).abs().max() < 0.05 * full.std()
    assert (quantized.argmax(-1) == full.argmax(-1)).float().mean() > 0.9


def test_unknown_weight_format_is_named():
    with pytest.raises(ValueError, match="weights must be one of \\('auto', 'int8'\\), got 'int3'"):
        quantize_weights(swiftkv_model(), "int3")
