"""The CUDA path: the same model, engine, least-squares start and distillation as on CPU, on a GPU.

Skipped where no CUDA device is present (CI has none); run with a GPU by `benchmarks/gpu_check.sh`.
"""

from __future__ import annotations

import copy

import pytest
import torch

from swiftkv.convert import convert_to_swiftkv
from swiftkv.distill import DistillTrainer
from swiftkv.distill.least_squares import fit_single_input_key_values
from swiftkv.engine import EngineConfig, LLMEngine, SamplingParams
from swiftkv.engine.llm_engine import request_output

from conftest import make_base_model, make_tiny_tokenizer, perturb_swiftkv_weights
from test_distill import SHARP, blocks, quick_config, student

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def swiftkv_model(family="llama", group_size=1):
    model = convert_to_swiftkv(make_base_model(family), 2, group_size)
    perturb_swiftkv_weights(model)
    return model


def prompts(count=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (int(length),), generator=generator).tolist()
            for length in torch.randint(5, 40, (count,), generator=generator)]


def hf_greedy(model, prompt, max_tokens):
    input_ids = torch.tensor([prompt], device=model.device)
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
                            do_sample=False, eos_token_id=None, pad_token_id=0)
    return output[0, len(prompt):].tolist()


@pytest.mark.parametrize("family, group_size", [("llama", 1), ("llama", 2), ("qwen2", 2)])
def test_swiftkv_logits_on_cuda_equal_cpu_logits(family, group_size):
    model = swiftkv_model(family, group_size)
    input_ids = torch.randint(3, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_cpu = model(input_ids).logits
        on_cuda = model.to(CUDA)(input_ids.to(CUDA)).logits.cpu()
    torch.testing.assert_close(on_cuda, on_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_kind", ["base", "swiftkv-g1", "swiftkv-g2"])
def test_engine_on_cuda_is_greedy_token_for_token_equal_to_transformers_on_cuda(model_kind):
    model = make_base_model("llama") if model_kind == "base" else swiftkv_model("llama", int(model_kind[-1]))
    model = model.to(CUDA)
    engine = LLMEngine(model, make_tiny_tokenizer(),
                       EngineConfig(dtype="float32", kv_cache_memory_gb=0.01, block_size=4))
    assert engine.runner.k_cache.is_cuda
    sequences = [engine.add_request(p, SamplingParams(max_tokens=10, ignore_eos=True)) for p in prompts()]
    while engine.has_unfinished():
        engine.step()
    for prompt, sequence in zip(prompts(), sequences):
        assert request_output(sequence).token_ids == hf_greedy(model, prompt, 10)


def test_seeded_sampling_on_cuda_is_reproducible():
    engine = LLMEngine(swiftkv_model().to(CUDA), make_tiny_tokenizer(),
                       EngineConfig(dtype="float32", kv_cache_memory_gb=0.01, block_size=4))
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=20, seed=7, ignore_eos=True)

    def sampled():
        sequence = engine.add_request(prompts()[0], params)
        while engine.has_unfinished():
            engine.step()
        return request_output(sequence).token_ids

    assert sampled() == sampled()


def test_least_squares_start_on_cuda_equals_the_cpu_fit():
    model = convert_to_swiftkv(make_base_model("llama", **SHARP), num_key_value_layers=3, key_value_group_size=1)
    perturb_swiftkv_weights(model, scale=0.3)
    on_cuda = copy.deepcopy(model).to(CUDA)
    fit_single_input_key_values(model, blocks(16), show_progress=False)
    fit_single_input_key_values(on_cuda, blocks(16), show_progress=False)
    for name, parameter in model.named_parameters():
        if "swiftkv" in name:
            torch.testing.assert_close(dict(on_cuda.named_parameters())[name].cpu(), parameter,
                                       atol=1e-3, rtol=1e-3)


def test_distillation_on_cuda_trains_in_bf16_and_lowers_held_out_kl(tmp_path):
    data = blocks(80)
    trainer = DistillTrainer(student(), data[8:], data[:8],
                             quick_config(max_steps=40, eval_every=40, save_every=40, learning_rate=1e-2,
                                          mixed_precision="auto"), tmp_path)
    assert trainer.accelerator.device.type == "cuda"
    assert trainer.accelerator.mixed_precision == "bf16"
    state = trainer.train()
    assert next(trainer.student.parameters()).is_cuda
    before, after = state.history[0], state.history[-1]
    assert after["eval_kl"] < 0.75 * before["eval_kl"]
    assert after["eval_top1_agreement"] > before["eval_top1_agreement"]
