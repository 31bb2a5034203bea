"""The SwiftKV model class: base equivalence, exact skipped prefill, AcrossKV cache sharing."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from swiftkv.convert import convert_to_swiftkv
from swiftkv.models.swiftkv import swiftkv_mode

from conftest import make_base_model, perturb_swiftkv_weights


def swiftkv_model_of(base_model, num_key_value_layers=3, key_value_group_size=1):
    model = convert_to_swiftkv(base_model, num_key_value_layers, key_value_group_size)
    perturb_swiftkv_weights(model)
    return model


def prompt(batch=2, length=11, seed=0, vocab=96):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_swiftkv_false_matches_base_logits(family):
    base = make_base_model(family)
    model = swiftkv_model_of(base)
    input_ids = prompt()
    with torch.no_grad(), swiftkv_mode(model, enabled=False):
        assert torch.equal(model(input_ids).logits, base(input_ids).logits)


def test_swiftkv_true_changes_logits(base_model):
    model = swiftkv_model_of(base_model)
    input_ids = prompt()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids).logits, base_model(input_ids).logits, atol=1e-3)


@pytest.mark.parametrize("group_size", [1, 3])
def test_skipped_prefill_gives_full_forward_next_token_logits(base_model, group_size):
    model = swiftkv_model_of(base_model, key_value_group_size=group_size)
    input_ids = prompt()
    with torch.no_grad():
        full = model(input_ids).logits[:, -1]
        skipped = model(input_ids, logits_to_keep=1, use_cache=True).logits[:, -1]
    torch.testing.assert_close(skipped, full, atol=1e-5, rtol=1e-5)


def greedy_without_cache(model, input_ids, steps):
    """Reference greedy decoding: a full-sequence forward (no cache, no skipping) per step."""
    tokens = input_ids
    for _ in range(steps):
        with torch.no_grad():
            next_token = model(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


@pytest.mark.parametrize("group_size", [1, 3])
def test_generate_with_skipped_prefill_matches_full_forward_greedy(base_model, group_size):
    model = swiftkv_model_of(base_model, key_value_group_size=group_size)
    input_ids = prompt(batch=1)
    generated = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=8,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generated, greedy_without_cache(model, input_ids, 8))


def test_left_padded_batch_generates_as_single_prompts(base_model):
    model = swiftkv_model_of(base_model)
    short, long = prompt(1, 6, seed=1)[0], prompt(1, 10, seed=2)[0]
    batch = torch.zeros(2, 10, dtype=torch.long)
    batch[0, 4:], batch[1] = short, long
    mask = (torch.arange(10) >= torch.tensor([[4], [0]])).long()
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    batched = model.generate(batch, attention_mask=mask, **kwargs)[:, 10:]
    for row, single in enumerate((short, long)):
        alone = model.generate(single[None], attention_mask=torch.ones(1, len(single), dtype=torch.long), **kwargs)
        assert torch.equal(batched[row], alone[0, len(single):])


def count_tokens_per_layer(model, run):
    """Tokens each decoder layer's MLP processes while `run()` executes."""
    counts = [0] * len(model.model.layers)
    hooks = [
        layer.mlp.register_forward_hook(lambda module, args, out, i=i: counts.__setitem__(i, counts[i] + args[0].shape[:-1].numel()))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def test_prefill_runs_later_layers_for_the_last_prompt_token_only(base_model):
    model = swiftkv_model_of(base_model, num_key_value_layers=3)
    input_ids = prompt(batch=1, length=20)
    counts = count_tokens_per_layer(model, lambda: model(input_ids, logits_to_keep=1, use_cache=True))
    assert counts == [20, 20, 20, 1, 1, 1]
    with swiftkv_mode(model, enabled=False):
        base_counts = count_tokens_per_layer(model, lambda: model(input_ids, logits_to_keep=1, use_cache=True))
    assert base_counts == [20] * 6


@pytest.mark.parametrize("group_size, expected_entries", [(1, 3 + 3), (3, 3 + 1)])
def test_across_kv_cache_holds_one_entry_per_group(base_model, group_size, expected_entries):
    model = swiftkv_model_of(base_model, num_key_value_layers=3, key_value_group_size=group_size)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt(batch=1), past_key_values=cache, use_cache=True, logits_to_keep=1)
    filled = [layer for layer in cache.layers if layer.keys is not None and layer.keys.numel() > 0]
    assert len(filled) == expected_entries == model.config.num_kv_cache_layers
    base_cache = DynamicCache(config=base_model.config)
    with torch.no_grad():
        base_model(prompt(batch=1), past_key_values=base_cache, use_cache=True)
    bytes_of = lambda c: sum(l.keys.nbytes + l.values.nbytes for l in c.layers if l.keys is not None and l.keys.numel())
    assert bytes_of(cache) / bytes_of(base_cache) == pytest.approx(expected_entries / 6)


def test_group_members_attend_to_the_same_key_values(base_model):
    model = swiftkv_model_of(base_model, num_key_value_layers=3, key_value_group_size=3)
    layers = model.model.layers
    assert hasattr(layers[3].self_attn, "k_proj_swiftkv")
    assert not hasattr(layers[4].self_attn, "k_proj_swiftkv") and not hasattr(layers[5].self_attn, "v_proj_swiftkv")
    assert {model.config.kv_cache_index(i) for i in (3, 4, 5)} == {3}


def test_training_forward_backpropagates_into_swiftkv_weights_only(base_model):
    model = swiftkv_model_of(base_model).train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("swiftkv" in name)
    input_ids = prompt()
    model(input_ids, labels=input_ids).loss.backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {name for name, _ in model.swiftkv_parameters()}
