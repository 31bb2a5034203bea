"""The CPU kernel for decode's few-row bf16 products: it computes F.linear to bf16 rounding for every row count
and tile shape, runs only where it should (few rows, no gradient), and the engine built on it still equals
transformers token for token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from swiftkv.engine import small_batch_linear
from swiftkv.engine.small_batch_linear import MAX_ROWS, SmallBatchLinear, linear, use_small_batch_linear

from swiftkv.convert import convert_to_swiftkv

from conftest import make_base_model
from test_engine import GREEDY, engine_for, hf_greedy, prompts, run

pytestmark = pytest.mark.skipif(not small_batch_linear.available(), reason="the kernel needs AVX512-BF16")


def swiftkv_model_bf16():
    return convert_to_swiftkv(make_base_model("llama", hidden_size=128), 2, 2).bfloat16()


def kernel(*args) -> torch.Tensor:
    return torch.ops.swiftkv_cpu.small_batch_linear(*args)


def bf16_reference(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """The product in float32 (bf16 products are exact there), rounded once to bf16."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 17, MAX_ROWS])  # every mix of 4-, 2- and 1-row tiles
@pytest.mark.parametrize("bias", [False, True])
def test_the_kernel_equals_the_float32_product_to_bf16_rounding(rows, bias):
    torch.manual_seed(rows)
    x = torch.randn(rows, 160, dtype=torch.bfloat16)
    weight = torch.randn(80, 160, dtype=torch.bfloat16) / 8  # 5 tasks of 16 features, 5 steps of 32 inputs
    bias = torch.randn(80, dtype=torch.bfloat16) if bias else None
    expected = bf16_reference(x, weight, bias).float()
    # float32 sums in another order: at most one bf16 step (2^-8 relative) where a sum sits near a rounding edge
    torch.testing.assert_close(kernel(x, weight, bias).float(), expected, rtol=2**-8, atol=1e-3)


def test_the_kernel_reads_rows_with_a_stride_and_keeps_leading_dimensions():
    torch.manual_seed(0)
    wide = torch.randn(2, 3, 96, dtype=torch.bfloat16)
    x = wide[..., :64]  # rows 96 apart
    weight = torch.randn(32, 64, dtype=torch.bfloat16)
    output = linear(x, weight)
    assert output.shape == (2, 3, 32)
    torch.testing.assert_close(output.float(), bf16_reference(x, weight, None).float(), rtol=2**-8, atol=1e-3)


def test_one_row_many_rows_and_gradients_go_to_pytorch(monkeypatch):
    calls, op = [], torch.ops.swiftkv_cpu.small_batch_linear
    monkeypatch.setattr(small_batch_linear.torch.ops.swiftkv_cpu, "small_batch_linear",
                        lambda *args: calls.append(args[0].shape[0]) or op(*args), raising=False)
    layer = SmallBatchLinear.sharing(nn.Linear(64, 32).to(torch.bfloat16))
    with torch.no_grad():
        for rows in (2, MAX_ROWS):
            layer(torch.randn(rows, 64, dtype=torch.bfloat16))
        for rows in (1, MAX_ROWS + 1):  # ATen's GEMV (oneDNN off, as in one-row steps) / oneDNN
            x = torch.randn(rows, 64, dtype=torch.bfloat16)
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert calls == [2, MAX_ROWS]
    x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()  # training: F.linear, which has a backward
    assert x.grad is not None and calls == [2, MAX_ROWS]


def test_the_engine_swaps_the_linears_the_kernel_takes_and_keeps_a_tied_head_tied():
    model = make_base_model("llama", hidden_size=128, tie_word_embeddings=True).to(torch.bfloat16)
    model.model.layers[0].mlp.down_proj = nn.Linear(128, 120, dtype=torch.bfloat16)  # 120 % 16: not for it
    use_small_batch_linear(model)
    layer = model.model.layers[1]
    assert type(layer.self_attn.o_proj) is SmallBatchLinear and type(layer.mlp.down_proj) is SmallBatchLinear
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert type(model.lm_head) is SmallBatchLinear and model.lm_head.weight is model.model.embed_tokens.weight
    assert use_small_batch_linear(model) is model and type(model.lm_head) is SmallBatchLinear  # idempotent

    float_model = make_base_model("llama", hidden_size=128)
    use_small_batch_linear(float_model)  # float32: left as it is
    assert not any(isinstance(module, SmallBatchLinear) for module in float_model.modules())


def test_switched_off_the_engine_keeps_pytorch_products(monkeypatch):
    monkeypatch.setenv(small_batch_linear.DISABLE_VARIABLE, "0")
    model = make_base_model("llama", hidden_size=128).to(torch.bfloat16)
    engine_for(model, dtype="bfloat16", block_size=16)
    assert not any(isinstance(module, SmallBatchLinear) for module in model.modules())
    assert engine_for(swiftkv_model_bf16(), dtype="bfloat16", block_size=16).runner.single_input_kv_linear is F.linear


@pytest.mark.parametrize("streams", [1, 3])
def test_a_bf16_engine_on_the_kernel_equals_transformers_greedy(streams):
    model = make_base_model("llama", hidden_size=128).to(torch.bfloat16)
    engine = engine_for(model, dtype="bfloat16", block_size=16)
    assert isinstance(model.model.layers[0].self_attn.o_proj, SmallBatchLinear)
    outputs = run(engine, prompts(streams), GREEDY)
    reference = make_base_model("llama", hidden_size=128).to(torch.bfloat16)  # plain nn.Linear, oneDNN
    for prompt, output in zip(prompts(streams), outputs):
        assert output.token_ids == hf_greedy(reference, prompt, len(output.token_ids))


def test_swiftkv_on_the_kernel_decodes_the_tokens_of_pytorch_products(monkeypatch):
    """SingleInputKV's stacked projection and the layers >= l through the kernel, against the same model in an
    engine with the kernel off: the same greedy tokens."""
    model = swiftkv_model_bf16()
    on_kernel = engine_for(model, dtype="bfloat16", block_size=16)
    assert on_kernel.runner.single_input_kv_linear is linear
    monkeypatch.setenv(small_batch_linear.DISABLE_VARIABLE, "0")
    plain = engine_for(swiftkv_model_bf16(), dtype="bfloat16", block_size=16)
    assert [o.token_ids for o in run(on_kernel, prompts(3), GREEDY)] == \
        [o.token_ids for o in run(plain, prompts(3), GREEDY)]
