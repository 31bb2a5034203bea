"""Distillation recipe: one dataclass, defaults from the SwiftKV reference (ArcticTraining), all overridable
from flags or a YAML/JSON file with the same field names."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from swiftkv.distill.least_squares import WEIGHTINGS

# What distillation trains: the SwiftKV projections (the paper's knowledge-preserving default, the base model stays
# inside the checkpoint), also every weight layers >= l use in SwiftKV mode (attention output, MLP, norms), or
# also layers < l, whose output is the single input every SwiftKV layer's K/V is projected from
TRAINABLE = ("swiftkv", "upper_layers", "all_layers")


def keeps_base_model(trainable: str) -> bool:
    """Whether a checkpoint distilled with `trainable` is still the base model with SwiftKV off (only the SwiftKV
    projections trained), so that the teacher and the evaluation baseline can be the checkpoint itself."""
    return trainable == "swiftkv"


@dataclass
class DistillConfig:
    learning_rate: float = 1e-3          # reference: 2e-4 (8B, large batches); 1e-3 converged faster here
    warmup_ratio: float = 0.05
    lr_schedule: str = "cosine"          # "cosine" or "linear" decay after warmup
    weight_decay: float = 0.0
    logits_loss_temp: float = 2.0        # KL(teacher || student) on logits / T, scaled by T^2
    hidden_loss_layer: int = -2          # index into hidden_states (embeddings = 0); -2 = output of layer L-2
    hidden_loss_weight: float = 0.0      # 0 disables the hidden-state MSE term
    seq_length: int = 512                # packed block length in tokens
    micro_batch_size: int = 4            # blocks per forward
    gradient_accumulation_steps: int = 1
    least_squares_blocks: int = 256      # training blocks for the closed-form K/V start; 0 = paper's copies
    least_squares_weighting: str = "attention"  # tokens weighted by the attention they receive, or "uniform"
    corpus_prompts: int = 512            # default data: built-in prompts the teacher answers
    corpus_max_new_tokens: int = 128     # ... tokens per answer
    corpus_samples: int = 1              # ... answers per prompt (seeded differently)
    corpus_free_text_ratio: float = 0.5  # share of default records that are teacher-continued raw text
    corpus_free_text_max_new_tokens: int = 128  # ... tokens per raw text (long texts teach long-range context)
    corpus_documentation_words: int = 0  # words of text people wrote (Python's documentation); 0 = none
    max_steps: int = 600                 # optimizer steps; the schedule spans them
    max_grad_norm: float = 1.0
    eval_every: int = 25
    save_every: int = 25
    keep_checkpoints: int = 2
    eval_fraction: float = 0.05          # share of prompts held out (by hash; never trained on)
    max_eval_blocks: int = 16
    mixed_precision: str = "auto"        # "auto" (bf16 where supported), "bf16", "fp16", "no"
    frozen_cache_gb: float = 8.0         # layer l-1 outputs + teacher logits of every block, computed once; 0 = off
    seed: int = 0
    trainable: str = "swiftkv"           # "swiftkv": the SwiftKV projections; "upper_layers": also layers >= l;
                                         # "all_layers": every decoder layer (embeddings and final norm stay)
    upper_layers_learning_rate: float = 1e-4  # with upper_layers / all_layers: the pretrained weights' rate

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("cosine", "linear"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'linear', got {self.lr_schedule!r}")
        positive = ("learning_rate", "upper_layers_learning_rate", "logits_loss_temp", "seq_length",
                    "micro_batch_size", "gradient_accumulation_steps", "max_steps", "eval_every", "save_every",
                    "keep_checkpoints", "corpus_prompts", "corpus_max_new_tokens", "corpus_free_text_max_new_tokens",
                    "corpus_samples")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.corpus_documentation_words < 0:
            raise ValueError(f"corpus_documentation_words must be >= 0, got {self.corpus_documentation_words}")
        if self.frozen_cache_gb < 0:
            raise ValueError(f"frozen_cache_gb must be >= 0, got {self.frozen_cache_gb}")
        if self.least_squares_blocks < 0:
            raise ValueError(f"least_squares_blocks must be >= 0, got {self.least_squares_blocks}")
        for name in ("warmup_ratio", "eval_fraction", "corpus_free_text_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.least_squares_weighting not in WEIGHTINGS:
            raise ValueError(f"least_squares_weighting must be one of {WEIGHTINGS}, "
                             f"got {self.least_squares_weighting!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if not self.keeps_base_model and self.hidden_loss_weight > 0:
            raise ValueError(f"hidden_loss_weight needs trainable='swiftkv': the hidden-state MSE compares layers "
                             f"that trainable={self.trainable!r} changes")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise ValueError(f"mixed_precision must be auto, bf16, fp16 or no, got {self.mixed_precision!r}")

    @property
    def keeps_base_model(self) -> bool:
        """Whether the distilled checkpoint with SwiftKV off is still the base model."""
        return keeps_base_model(self.trainable)

    @property
    def corpus_free_texts(self) -> int:
        """Free-text records beside the chat answers, so that they are `corpus_free_text_ratio` of the two."""
        chat = self.corpus_prompts * self.corpus_samples
        return round(chat * self.corpus_free_text_ratio / (1 - self.corpus_free_text_ratio))

    @property
    def tokens_per_step(self) -> int:
        return self.seq_length * self.micro_batch_size * self.gradient_accumulation_steps

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "DistillConfig":
        import yaml

        values = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown distillation settings {sorted(unknown)}")
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)
