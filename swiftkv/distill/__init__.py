"""Knowledge-preserving distillation of a SwiftKV checkpoint (the base model is the teacher)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from swiftkv.distill.config import DistillConfig
from swiftkv.distill.contamination import drop_evaluation_text
from swiftkv.distill.corpus import documentation_corpus, free_text_corpus, teacher_corpus
from swiftkv.distill.data import DataError, load_dataset_records, read_records, train_eval_blocks
from swiftkv.distill.trainer import DistillTrainer, TrainerState

DEFAULT_DATA = "default"


def load_records(sources: list[str], teacher_for_corpus, tokenizer, config: DistillConfig) -> list[dict]:
    """Records from each source: `default` (teacher-generated corpus), a local file, or `hf:name[:split]`."""
    records = []
    for source in sources:
        if source == DEFAULT_DATA:
            teacher = teacher_for_corpus()
            records += teacher_corpus(teacher, tokenizer, num_prompts=config.corpus_prompts,
                                      max_new_tokens=config.corpus_max_new_tokens,
                                      samples_per_prompt=config.corpus_samples, seed=config.seed)
            if config.corpus_free_texts:
                records += free_text_corpus(teacher, tokenizer, config.corpus_free_texts,
                                            max_new_tokens=config.corpus_free_text_max_new_tokens, seed=config.seed)
            records += documentation_corpus(config.corpus_documentation_words, seed=config.seed)
        elif source.startswith("hf:"):
            name, _, split = source[3:].partition(":")
            records += load_dataset_records(name, split or "train")
        elif Path(source).exists():
            records += read_records(source)
        else:
            raise DataError(f"data source {source!r} is not 'default', an existing file, or hf:<dataset>[:split]")
    return records


def corpus_teacher(model: str, teacher: Optional[str] = None):
    """A loader of the model that writes the default corpus: the separate teacher, or `model` with swiftkv off."""
    from swiftkv.loading import load_model

    def load():
        # bf16: generation only, much faster; on the accelerator when there is one (each process's own GPU)
        generator = load_model(teacher or model, dtype="bfloat16", device="auto")
        if not teacher:
            generator.config.swiftkv = False
        return generator

    return load


def distillation_blocks(sources: list[str], model: str, tokenizer, config: DistillConfig,
                        teacher: Optional[str] = None) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """Records of `sources`, and their packed training and held-out blocks (the split every run uses)."""
    records, caught = drop_evaluation_text(load_records(sources, corpus_teacher(model, teacher), tokenizer, config))
    if caught:
        print(f"left out {sum(caught.values())} training records that share 13 words with an evaluation set: "
              + ", ".join(f"{name} {count}" for name, count in sorted(caught.items())))
    train_blocks, eval_blocks = train_eval_blocks(records, tokenizer, config.seq_length, config.eval_fraction,
                                                  config.seed)
    return records, train_blocks, eval_blocks


def process_state():
    """This process's accelerate state (one process unless launched by `accelerate launch` / torchrun). The
    Accelerator made later reads ACCELERATE_USE_CPU too; the first state created decides for both."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def distill(model: str, out_dir: str | Path, data: list[str] | None = None, teacher: Optional[str] = None,
            config: DistillConfig | None = None, resume: bool = False) -> tuple[Path, TrainerState]:
    """Distill the SwiftKV checkpoint `model` and save the result (full checkpoint + tokenizer) to `out_dir`."""
    from swiftkv.checkpoint import output_folder, save_checkpoint
    from swiftkv.loading import load_model, load_tokenizer
    from swiftkv.models.swiftkv import swiftkv_mode

    config = config or DistillConfig()
    out_dir = output_folder(out_dir)
    student = load_model(model, dtype="float32")
    if not student.config.model_type.endswith("_swiftkv"):
        raise ValueError(f"{model} is not a SwiftKV checkpoint (model_type {student.config.model_type!r}); "
                         "run `swiftkv convert` first")
    student.config.swiftkv = True
    tokenizer = load_tokenizer(model)
    teacher_model = load_model(teacher, dtype="float32") if teacher else None

    state = process_state()
    with state.main_process_first():  # one process writes the teacher corpus; the others read it
        _, train_blocks, eval_blocks = distillation_blocks(data or [DEFAULT_DATA], model, tokenizer, config, teacher)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "distill_config.json").write_text(json.dumps(
        {**config.to_dict(), "model": model, "teacher": teacher, "data": data or [DEFAULT_DATA],
         "train_blocks": len(train_blocks), "eval_blocks": len(eval_blocks)}, indent=2))
    trainer = DistillTrainer(student, train_blocks, eval_blocks, config, out_dir, teacher_model)
    state = trainer.train(resume=resume)
    if trainer.accelerator.is_main_process:
        final = trainer.student
        if not config.keeps_base_model:  # with SwiftKV off it is no longer the base model
            final.config.swiftkv_base_preserved = False
        with swiftkv_mode(final, enabled=True):
            save_checkpoint(final, out_dir / "model", tokenizer)
    return out_dir / "model", state


__all__ = ["DistillConfig", "DistillTrainer", "DataError", "distill", "distillation_blocks", "load_records",
           "process_state"]
