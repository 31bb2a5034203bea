"""Distillation loop: teacher = the checkpoint with `swiftkv=False` (or a separate base model), student =
the same weights with `swiftkv=True`; only `norm_swiftkv` and `*_proj_swiftkv` train (with
`trainable="upper_layers"`, the weights layers >= l run in SwiftKV mode too; with "all_layers", every decoder
layer; the teacher then runs a frozen copy of the layers that train).

Runs unchanged under `accelerate launch` (DDP, FSDP, DeepSpeed): the teacher+student forward is one
`nn.Module`, so the wrappers see every trainable parameter used in `forward`. Checkpoints (safetensors +
JSON, never pickle: `checkpointing.py`) are written into a temporary folder that is renamed when complete,
so a killed run resumes from its last whole checkpoint with the same data order, optimizer, schedule and
RNG state.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from swiftkv.distill.checkpointing import check_supported, load_training_state, save_training_state
from swiftkv.distill.config import DistillConfig, keeps_base_model
from swiftkv.distill.frozen_cache import FrozenOutputCache
from swiftkv.distill.least_squares import fit_single_input_key_values
from swiftkv.distill.losses import hidden_state_loss, logits_distillation_loss
from swiftkv.eval.fidelity import token_kl_and_agreement

CHECKPOINTS = "checkpoints"


def freeze_all_but_swiftkv(model: nn.Module, trainable: str = "swiftkv") -> list[str]:
    """Make exactly the SwiftKV parameters trainable (with "upper_layers", also the weights layers >= l use in
    SwiftKV mode: attention output, MLP, norms; with "all_layers", those and every weight of layers < l);
    return their names. The base q/k/v projections of layers >= l never train: SwiftKV mode does not run them."""
    config = model.config
    first = {"swiftkv": None, "upper_layers": config.num_key_value_layers, "all_layers": 0}[trainable]
    layers = () if first is None else tuple(f"model.layers.{i}." for i in range(first, config.num_hidden_layers))
    unused = tuple(f"model.layers.{i}.self_attn.{p}_proj." for i in range(config.num_key_value_layers,
                                                                          config.num_hidden_layers) for p in "qkv")
    names = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("swiftkv" in name or (name.startswith(layers) and not name.startswith(unused)))
        if parameter.requires_grad:
            names.append(name)
    if not any("swiftkv" in name for name in names):
        raise ValueError("the model has no SwiftKV parameters to train: convert it with num_key_value_layers < "
                         "num_hidden_layers first")
    return names


class _CaptureOutput:
    """Keeps the output of one module during a forward (the hidden state the MSE term compares)."""

    def __init__(self, module: Optional[nn.Module]):
        self.module, self.value, self.handle = module, None, None

    def __enter__(self):
        if self.module is not None:
            self.handle = self.module.register_forward_hook(lambda m, args, out: setattr(self, "value", out))
        return self

    def __exit__(self, *exc_info):
        if self.handle is not None:
            self.handle.remove()


@dataclass
class DistillOutput:
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    student_hidden: Optional[torch.Tensor]
    teacher_hidden: Optional[torch.Tensor]


class DistillationModel(nn.Module):
    """Teacher and student logits for one batch `[batch, seq]`.

    With no separate teacher, layers `0..l-1` are shared by teacher and student and computed once,
    without gradients; the teacher then runs layers `l..L-1` as the base model and the student runs
    them in SwiftKV mode. When distillation trains the layers' own weights (`trainable` "upper_layers": layers
    >= l; "all_layers": every layer), the teacher runs a copy of them taken before training, so it stays the
    base model; with "all_layers" the student runs layers `0..l-1` itself, with gradients.
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None, hidden_loss_layer: Optional[int] = None,
                 trainable: str = "swiftkv"):
        super().__init__()
        self.student = student
        self.teacher = [teacher] if teacher is not None else []  # a list: not a submodule, never trained
        config = student.config
        self.lower_layers_train = trainable == "all_layers"
        self.teacher_layers = []  # frozen copies of the layers that train, from the first of them on; a list too
        if not keeps_base_model(trainable) and teacher is None:
            first = 0 if self.lower_layers_train else config.num_key_value_layers
            self.teacher_layers = [copy.deepcopy(student.model.layers[first:]).requires_grad_(False)]
        self.hidden_layer_index = None
        if hidden_loss_layer is not None:
            index = hidden_loss_layer % (config.num_hidden_layers + 1)  # hidden_states[0] is the embeddings
            if index <= config.num_key_value_layers:
                raise ValueError(f"hidden_loss_layer={hidden_loss_layer} is not a SwiftKV layer output "
                                 f"(layers >= {config.num_key_value_layers} are)")
            self.hidden_layer_index = index - 1

    def _layer(self, model: nn.Module) -> Optional[nn.Module]:
        return None if self.hidden_layer_index is None else model.model.layers[self.hidden_layer_index]

    @property
    def frozen_outputs_cacheable(self) -> bool:
        """The teacher's logits (and layers 0..l-1, unless they train) depend only on the tokens (no separate
        teacher, no hidden MSE)."""
        return not self.teacher and self.hidden_layer_index is None

    @torch.no_grad()
    def frozen_outputs(self, input_ids: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """The output of layer l-1 shared by teacher and student (None when layers < l train) and the teacher's
        logits."""
        decoder, config = self.student.model, self.student.config
        embeds = decoder.embed_tokens(input_ids)
        inputs = decoder.prepare_layer_inputs(embeds, use_cache=False)
        lower = range(config.num_key_value_layers)
        shared = None if self.lower_layers_train else decoder.run_layers(embeds, lower, inputs)
        teacher_indices = range(0 if self.lower_layers_train else len(lower), config.num_hidden_layers)
        copies = self.teacher_layers[0].to(embeds.device) if self.teacher_layers else None  # moved once
        teacher_hidden = decoder.run_layers(embeds if shared is None else shared, teacher_indices, inputs,
                                            layers=copies)
        return shared, self.student.lm_head(decoder.norm(teacher_hidden))

    def forward(self, input_ids: torch.Tensor, shared: Optional[torch.Tensor] = None,
                teacher_logits: Optional[torch.Tensor] = None) -> DistillOutput:
        """`shared` and `teacher_logits`, when given, are `frozen_outputs(input_ids)` computed earlier."""
        student = self.student
        if self.teacher:
            teacher = self.teacher[0]
            with torch.no_grad(), _CaptureOutput(self._layer(teacher)) as teacher_capture:
                teacher_logits = teacher(input_ids, use_cache=False).logits
            with _CaptureOutput(self._layer(student)) as student_capture:
                student_logits = student(input_ids, use_cache=False).logits
            return DistillOutput(student_logits, teacher_logits, student_capture.value, teacher_capture.value)
        with _CaptureOutput(self._layer(student) if teacher_logits is None else None) as teacher_capture:
            if teacher_logits is None:
                shared, teacher_logits = self.frozen_outputs(input_ids)
        decoder = student.model
        embeds = decoder.embed_tokens(input_ids)
        inputs = decoder.prepare_layer_inputs(embeds, use_cache=False)
        if shared is None:  # layers < l train: the student runs them itself
            shared = decoder.run_layers(embeds, range(student.config.num_key_value_layers), inputs)
        with _CaptureOutput(self._layer(student)) as student_capture:
            student_hidden = decoder.swiftkv_layers(shared, inputs)
        student_logits = student.lm_head(decoder.norm(student_hidden))
        return DistillOutput(student_logits, teacher_logits, student_capture.value, teacher_capture.value)


@dataclass
class TrainerState:
    """Progress that must survive a restart (saved with every checkpoint)."""

    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.train_seconds, self.history = state["train_seconds"], state["history"]


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"  # CPU autocast to bf16: several times faster matmuls than fp32 here


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    checkpoints = sorted((out_dir / CHECKPOINTS).glob("step-*"))
    return checkpoints[-1] if checkpoints else None


class DistillTrainer:
    def __init__(self, model: nn.Module, train_blocks: torch.Tensor, eval_blocks: torch.Tensor,
                 config: DistillConfig, out_dir: str | Path, teacher: Optional[nn.Module] = None):
        from accelerate import Accelerator
        from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

        self.config, self.out_dir = config, Path(out_dir)
        self.accelerator = Accelerator(mixed_precision=_mixed_precision(config.mixed_precision),
                                       gradient_accumulation_steps=config.gradient_accumulation_steps)
        torch.manual_seed(config.seed)
        self.trainable_names = freeze_all_but_swiftkv(model, config.trainable)
        if teacher is not None:
            teacher.requires_grad_(False).eval().to(self.accelerator.device)
        hidden_layer = config.hidden_loss_layer if config.hidden_loss_weight > 0 else None
        distill_model = DistillationModel(model, teacher, hidden_layer, config.trainable)
        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        groups = [{"params": [p for name, p in trained.items() if "swiftkv" in name], "lr": config.learning_rate}]
        if not config.keeps_base_model:  # pretrained weights: a gentler rate than the new projections'
            groups.append({"params": [p for name, p in trained.items() if "swiftkv" not in name],
                           "lr": config.upper_layers_learning_rate})
        optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
        make_schedule = (get_cosine_schedule_with_warmup if config.lr_schedule == "cosine"
                         else get_linear_schedule_with_warmup)
        self.scheduler = make_schedule(optimizer, math.ceil(config.warmup_ratio * config.max_steps), config.max_steps)
        check_supported(self.accelerator.distributed_type)
        self.model, self.optimizer = self.accelerator.prepare(distill_model, optimizer)
        self.state = TrainerState()
        self.train_blocks, self.eval_blocks = train_blocks, eval_blocks[: config.max_eval_blocks]
        self.train_cache: Optional[FrozenOutputCache] = None
        self.eval_cache: Optional[FrozenOutputCache] = None
        if len(train_blocks) < config.micro_batch_size * self.accelerator.num_processes:
            raise ValueError(f"{len(train_blocks)} training blocks are fewer than one batch "
                             f"({config.micro_batch_size} x {self.accelerator.num_processes} processes)")

    @property
    def student(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).student

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.student.named_parameters() if p.requires_grad}

    def micro_batch(self, step: int, accumulation_index: int) -> torch.Tensor:
        """Indices of one micro-batch's blocks: a seeded permutation per epoch, sharded across processes."""
        config, accelerator = self.config, self.accelerator
        size = config.micro_batch_size
        global_index = (step * config.gradient_accumulation_steps + accumulation_index) * accelerator.num_processes
        global_index += accelerator.process_index
        batches_per_epoch = len(self.train_blocks) // size
        epoch, offset = divmod(global_index, batches_per_epoch)
        order = torch.randperm(len(self.train_blocks), generator=torch.Generator().manual_seed(config.seed + epoch))
        return order[offset * size:(offset + 1) * size]

    def loss(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict]:
        device = self.accelerator.device
        cached = self.train_cache.select(indices, device) if self.train_cache is not None else {}
        output = self.model(self.train_blocks[indices].to(device), **cached)
        kl = logits_distillation_loss(output.student_logits, output.teacher_logits, self.config.logits_loss_temp)
        loss, parts = kl, {"kl_loss": kl.item()}
        if output.student_hidden is not None:
            mse = hidden_state_loss(output.student_hidden, output.teacher_hidden)
            loss = loss + self.config.hidden_loss_weight * mse
            parts["hidden_mse"] = mse.item()
        return loss, parts

    @torch.no_grad()
    def evaluate(self, blocks: Optional[torch.Tensor] = None) -> dict:
        """KL(teacher || student) at T=1 and top-1 agreement, token-weighted, on `blocks` (default: held out)."""
        cache = self.eval_cache if blocks is None else None
        blocks = self.eval_blocks if blocks is None else blocks
        device, size = self.accelerator.device, self.config.micro_batch_size
        self.model.eval()
        total_kl = total_agreement = total = 0.0
        for start in range(0, len(blocks), size):
            cached = cache.select(slice(start, start + size), device) if cache is not None else {}
            with self.accelerator.autocast():
                output = self.model(blocks[start:start + size].to(device), **cached)
            kl, agreement = token_kl_and_agreement(output.teacher_logits, output.student_logits)
            total_kl, total_agreement, total = total_kl + kl.sum().item(), total_agreement + agreement.sum().item(), total + kl.numel()
        self.model.train()
        return {"eval_kl": total_kl / max(total, 1), "eval_top1_agreement": total_agreement / max(total, 1)}

    def save(self) -> Path:
        """Atomic checkpoint: write `tmp-step-N`, then rename to `step-N`; prune old ones."""
        checkpoints = self.out_dir / CHECKPOINTS
        final = checkpoints / f"step-{self.state.step:06d}"
        partial = checkpoints / f"tmp-step-{self.state.step:06d}"
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        save_training_state(partial, self.trainable_parameters(), self.optimizer, self.scheduler,
                            self.state.state_dict(), accelerator.process_index, accelerator.is_main_process)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            for old in sorted(checkpoints.glob("step-*"))[: -self.config.keep_checkpoints]:
                shutil.rmtree(old)
        return final

    def resume(self) -> Optional[Path]:
        """Load the last whole checkpoint of `out_dir`, if there is one; returns it."""
        checkpoint = latest_checkpoint(self.out_dir)
        if checkpoint is None:
            return None
        self.state.load_state_dict(load_training_state(checkpoint, self.trainable_parameters(), self.optimizer,
                                                       self.scheduler, self.accelerator.process_index))
        return checkpoint

    def initialize(self) -> None:
        """Held-out scores of the converted model, then the least-squares K/V start and its scores (step 0)."""
        config, state = self.config, self.state
        self._log({"step": 0, "tokens_seen": 0, "stage": "converted", **self.evaluate()})
        if config.least_squares_blocks == 0:
            return
        started = time.perf_counter()
        accelerator = self.accelerator
        blocks = self.train_blocks[: config.least_squares_blocks]
        with accelerator.autocast():  # each process fits its share; the sums of the moments are shared
            fit = fit_single_input_key_values(
                self.student, blocks[accelerator.process_index::accelerator.num_processes], config.micro_batch_size,
                show_progress=accelerator.is_local_main_process,
                all_reduce=self._sum_across_processes if accelerator.num_processes > 1 else None,
                weighting=config.least_squares_weighting)
        state.train_seconds += time.perf_counter() - started
        self._log({"step": 0, "tokens_seen": 0, "stage": "least_squares", "least_squares_tokens": fit.tokens,
                   "key_value_relative_error_before": fit.relative_error_before,
                   "key_value_relative_error_after": fit.relative_error_after,
                   "train_seconds": state.train_seconds, **self.evaluate()})

    def cache_frozen_outputs(self) -> None:
        """Layer l-1 outputs and teacher logits of the training and held-out blocks, when they fit the budget."""
        config, accelerator = self.config, self.accelerator
        model = accelerator.unwrap_model(self.model)
        if config.frozen_cache_gb == 0 or not model.frozen_outputs_cacheable:
            return
        started = time.perf_counter()

        def build(blocks: torch.Tensor, budget_bytes: float) -> Optional[FrozenOutputCache]:
            return FrozenOutputCache.build(model, blocks, config.micro_batch_size, accelerator.device, budget_bytes,
                                           accelerator.autocast, accelerator.is_local_main_process)

        budget = config.frozen_cache_gb * 2**30
        self.eval_cache = build(self.eval_blocks, budget)
        eval_bytes = self.eval_cache.nbytes if self.eval_cache is not None else 0
        self.train_cache = build(self.train_blocks, budget - eval_bytes)
        train_bytes = self.train_cache.nbytes if self.train_cache is not None else 0
        seconds = time.perf_counter() - started
        self.state.train_seconds += seconds
        if self.train_cache is None and accelerator.is_local_main_process:
            tqdm.write(f"teacher outputs of {len(self.train_blocks)} training blocks exceed frozen_cache_gb="
                       f"{config.frozen_cache_gb}: computing them at every step instead")
        self._log({"step": self.state.step, "tokens_seen": self.state.tokens_seen, "stage": "frozen_cache",
                   "frozen_cache_gb": (eval_bytes + train_bytes) / 2**30, "frozen_cache_seconds": seconds,
                   "train_seconds": self.state.train_seconds})

    def _sum_across_processes(self, total: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(total.to(self.accelerator.device), reduction="sum").to(total.device)

    def _log(self, record: dict) -> None:
        self.state.history.append(record)
        if self.accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            partial = self.out_dir / "history.json.tmp"  # replaced whole, so a kill never leaves half a file
            partial.write_text(json.dumps(self.state.history, indent=1))
            partial.replace(self.out_dir / "history.json")

    def train(self, resume: bool = False, on_step: Optional[Callable[[int], None]] = None) -> TrainerState:
        """Run to `max_steps`; `on_step(step)` is called after each optimizer step (tests, callbacks)."""
        config, accelerator, state = self.config, self.accelerator, self.state
        resumed = self.resume() if resume else None
        if resume and accelerator.is_local_main_process:
            tqdm.write(f"resumed from {resumed} at step {state.step}" if resumed else
                       f"nothing to resume in {self.out_dir / CHECKPOINTS}: starting from step 0")
        if not resumed and state.step == 0:
            self.initialize()
        if state.step < config.max_steps:
            self.cache_frozen_outputs()
        self.model.train()
        bar = tqdm(total=config.max_steps, initial=state.step, desc="distill", unit="step",
                   disable=not accelerator.is_local_main_process)
        while state.step < config.max_steps:
            started = time.perf_counter()
            parts = {}
            for accumulation_index in range(config.gradient_accumulation_steps):
                with accelerator.accumulate(self.model):
                    loss, parts = self.loss(self.micro_batch(state.step, accumulation_index))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
            self.scheduler.step()
            state.step += 1
            step_tokens = config.tokens_per_step * accelerator.num_processes
            state.tokens_seen += step_tokens
            elapsed = time.perf_counter() - started
            state.train_seconds += elapsed
            bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{step_tokens / elapsed:.0f}",
                            lr=f"{self.scheduler.get_last_lr()[0]:.1e}")
            bar.update(1)
            record = {"step": state.step, "tokens_seen": state.tokens_seen, "loss": loss.item(), **parts,
                      "lr": self.scheduler.get_last_lr()[0], "tokens_per_second": step_tokens / elapsed,
                      "train_seconds": state.train_seconds}
            if state.step % config.eval_every == 0 or state.step == config.max_steps:
                record.update(self.evaluate())
                bar.write(f"step {state.step}: eval KL {record['eval_kl']:.4f}, "
                          f"top-1 agreement {record['eval_top1_agreement']:.3f}")
            self._log(record)
            if state.step % config.save_every == 0 or state.step == config.max_steps:
                self.save()
            if on_step is not None:
                on_step(state.step)
        bar.close()
        return state
