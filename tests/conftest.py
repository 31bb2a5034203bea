"""Tiny random-weight models: fast fixtures that exercise every code path the real model does."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels (engine/paged_attention.py) then run in Triton's interpreter,
    os.environ.setdefault("TRITON_INTERPRET", "1")  # which must be chosen before transformers imports Triton

from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

BASE_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def make_base_model(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config_class, model_class = BASE_FAMILIES[family]
    fields = dict(TINY, **overrides)
    if family == "mistral":
        fields["sliding_window"] = None
    torch.manual_seed(seed)
    model = model_class(config_class(**fields, attn_implementation="sdpa"))
    return model.eval()


def perturb_swiftkv_weights(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Move the SwiftKV projections away from their initialization, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in model.swiftkv_parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(params=["llama", "qwen2"])
def family(request) -> str:
    return request.param


@pytest.fixture
def base_model(family):
    return make_base_model(family)


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer():
    """A byte-free word-level tokenizer over a small vocabulary (TINY's 96 ids), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "user", "assistant", "system"]
    words = [f"w{i}" for i in range(TINY["vocab_size"] - len(specials))]
    vocab = {token: index for index, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<unk>", chat_template=CHAT_TEMPLATE)


@pytest.fixture
def tiny_base_dir(tmp_path):
    """A base Llama checkpoint directory with tokenizer, as a user would have on disk."""
    path = tmp_path / "tiny-llama"
    make_base_model("llama").save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path
