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
from swiftkv.engine import SamplingParams
from swiftkv.engine.sequence import Chunk

from conftest import make_base_model, make_tiny_tokenizer, perturb_swiftkv_weights
from test_distill import SHARP, blocks, quick_config, student
from test_engine import GREEDY, engine_for, hf_greedy, prompts, run, swiftkv_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


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
    engine = engine_for(model)
    assert engine.runner.k_cache.is_cuda and engine.runner.decode_graphs is not None
    for prompt, output in zip(prompts(), run(engine, prompts(), GREEDY)):
        assert output.token_ids == hf_greedy(model, prompt, 10)


@pytest.mark.parametrize("model_kind", ["base", "swiftkv-g2"])
def test_decode_from_cuda_graphs_equals_eager_decode_and_transformers(model_kind):
    """Requests ending at different steps, so the batch moves through several buckets, padded (5 -> 8, 3 -> 4);
    the last request arrives two steps late, so its prompt runs in an eager mixed step between replays."""
    model = make_base_model("llama") if model_kind == "base" else swiftkv_model("llama", 2)
    model = model.to(CUDA)
    token_prompts = prompts(6, seed=1)
    lengths = [3, 12, 5, 9, 7, 12]
    outputs = {}
    for graphs in (True, False):
        engine = engine_for(model, cuda_graphs=graphs, max_num_seqs=8)
        assert (engine.runner.decode_graphs is not None) == graphs
        sequences = [engine.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
                     for prompt, n in zip(token_prompts[:-1], lengths)]
        engine.step(), engine.step()
        sequences.append(engine.add_request(token_prompts[-1], SamplingParams(max_tokens=lengths[-1],
                                                                              ignore_eos=True)))
        while engine.has_unfinished():
            engine.step()
        outputs[graphs] = [sequence.output_token_ids for sequence in sequences]
    assert outputs[True] == outputs[False]
    for prompt, n, output in zip(token_prompts, lengths, outputs[True]):
        assert output == hf_greedy(model, prompt, n)


def test_paged_kernel_on_cuda_in_bf16_is_close_to_attention_over_gathered_keys():
    from test_paged_attention import attention_over_gathered_keys
    from swiftkv.engine.paged_attention import paged_decode_attention

    generator = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(8, 4096 * 16, 128, generator=generator).to(CUDA, torch.bfloat16) for _ in "kv")
    key_counts = torch.tensor([1, 100, 3000, 8192], dtype=torch.int32)
    block_tables = torch.stack([torch.randperm(4096, generator=generator)[:512] for _ in key_counts]).int()
    query = torch.randn(4, 32, 128, generator=generator).to(CUDA, torch.bfloat16)
    output = paged_decode_attention(query, k_cache, v_cache, block_tables.to(CUDA), key_counts.to(CUDA), 16,
                                    128 ** -0.5)
    expected = attention_over_gathered_keys(query.float().cpu(), k_cache.float().cpu(), v_cache.float().cpu(),
                                            block_tables, key_counts, 16, 128 ** -0.5)
    torch.testing.assert_close(output.float().cpu(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_an_8_bit_kv_cache_on_cuda_keeps_logits_close_to_the_exact_cache(kv_cache_dtype):
    model = swiftkv_model().to(torch.bfloat16).to(CUDA)
    logits = []
    for engine in (engine_for(model), engine_for(model, kv_cache_dtype=kv_cache_dtype)):
        sequence = engine.add_request(prompts(1)[0], SamplingParams(max_tokens=1))
        engine.blocks.reserve(sequence, len(sequence))
        logits.append(engine.runner.run([Chunk(sequence, 0, len(sequence))])[0].cpu())
    assert (logits[1] - logits[0]).abs().max() < 0.1 * logits[0].std()
    assert logits[1].argmax() == logits[0].argmax()


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_an_8_bit_kv_cache_decodes_from_cuda_graphs_as_it_does_eagerly(kv_cache_dtype):
    model = swiftkv_model("llama", 2).to(CUDA)
    outputs = {}
    for graphs in (True, False):
        engine = engine_for(model, cuda_graphs=graphs, kv_cache_dtype=kv_cache_dtype)
        assert (engine.runner.decode_graphs is not None) == graphs
        outputs[graphs] = [output.token_ids for output in run(engine, prompts(), GREEDY)]
    assert outputs[True] == outputs[False]


def test_seeded_sampling_on_cuda_is_reproducible_and_really_samples():
    engine = engine_for(swiftkv_model().to(CUDA))
    params = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, top_k=40, seed=7, ignore_eos=True)
    first, second = (run(engine, prompts()[:1], params)[0].token_ids for _ in range(2))
    assert first == second
    other_seed = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, top_k=40, seed=8, ignore_eos=True)
    assert run(engine, prompts()[:1], other_seed)[0].token_ids != first
    assert run(engine, prompts()[:1], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids != first


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


def test_eval_fidelity_on_cuda_equals_eval_on_cpu(tmp_path):
    from swiftkv.eval.runner import Candidate, evaluate_fidelity
    from swiftkv.eval.tasks import Task

    model = swiftkv_model()
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(f'{{"prompt": "w{i} w{i + 1} w{i + 2}"}}\n' for i in range(5)))

    def fidelity(model):
        return evaluate_fidelity(Candidate("swiftkv", model, True), Candidate("base", model, False),
                                 make_tiny_tokenizer(), Task("p", "fidelity", prompts_file), None, 3, 6)

    on_cpu = fidelity(model)
    on_cuda = fidelity(copy.deepcopy(model).to(CUDA))  # inputs follow the model to its device
    assert on_cuda.metrics["greedy_exact_match"].values == on_cpu.metrics["greedy_exact_match"].values
    assert on_cuda.metrics["kl"].values == pytest.approx(on_cpu.metrics["kl"].values, abs=1e-4)
