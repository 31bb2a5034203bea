"""Distillation: what trains, that it learns, that it resumes exactly, and that bad data is named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from swiftkv.checkpoint import save_checkpoint
from swiftkv.convert import convert_to_swiftkv
from swiftkv.distill import DistillConfig, DistillTrainer
from swiftkv.distill.checkpointing import CheckpointError
from swiftkv.distill import corpus, distillation_blocks, load_records
from swiftkv.distill.contamination import drop_evaluation_text
from swiftkv.distill.corpus import free_text_corpus, teacher_corpus, teacher_fingerprint
from swiftkv.distill.least_squares import _AttentionReceived, _Moments, fit_single_input_key_values
from swiftkv.distill.data import (DataError, encode_record, pack_sequences, read_records, split_records,
                                  train_eval_blocks)
from swiftkv.distill.losses import (_CompiledWithFallback, _kl_teacher_student, hidden_state_loss,
                                   logits_distillation_loss)
from swiftkv.distill.prompts import builtin_prompts, free_text_openings
from swiftkv.distill.trainer import DistillationModel, freeze_all_but_swiftkv
from swiftkv.loading import load_model
from swiftkv.models.swiftkv import swiftkv_mode

from conftest import make_base_model, make_tiny_tokenizer, perturb_swiftkv_weights

SHARP = dict(initializer_range=0.25)  # peaked teacher distributions, so KL has something to fix


def student(seed=0):
    model = convert_to_swiftkv(make_base_model("llama", **SHARP), num_key_value_layers=3)
    perturb_swiftkv_weights(model, seed=seed, scale=0.3)
    return model


def blocks(n=48, length=24, seed=0):
    return torch.randint(3, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def quick_config(**overrides):
    return DistillConfig(**{**dict(max_steps=12, seq_length=24, micro_batch_size=4, learning_rate=3e-3,
                                   eval_every=6, save_every=4, mixed_precision="no"), **overrides})


def trainable_state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "swiftkv" in name}


def test_trainable_set_is_exactly_the_swiftkv_parameters():
    model = student()
    names = freeze_all_but_swiftkv(model)
    expected = {"model.norm_swiftkv.weight"} | {
        f"model.layers.{i}.self_attn.{p}_proj_swiftkv.weight" for i in (3, 4, 5) for p in "qkv"}
    assert set(names) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


def test_upper_layers_option_also_trains_what_swiftkv_layers_run_but_not_their_unused_projections():
    model = student()
    names = set(freeze_all_but_swiftkv(model, "upper_layers"))
    upper = {f"model.layers.{i}.{part}.weight" for i in (3, 4, 5) for part in (
        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
        "post_attention_layernorm")}
    assert upper <= names and set(freeze_all_but_swiftkv(student())) <= names
    assert not any(name.startswith("model.layers.2.") or ".self_attn.k_proj." in name for name in names)


def test_all_layers_option_also_trains_the_layers_below_l_but_not_embeddings_or_unused_projections():
    model = student()
    names = set(freeze_all_but_swiftkv(model, "all_layers"))
    lower = {f"model.layers.{i}.{part}.weight" for i in (0, 1, 2) for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj",
        "input_layernorm")}
    assert lower <= names and set(freeze_all_but_swiftkv(student(), "upper_layers")) <= names
    assert not any(name.startswith(("model.embed_tokens", "model.norm.", "lm_head")) for name in names)
    assert not any(f"layers.{i}.self_attn.{p}_proj." in name for i in (3, 4, 5) for p in "qkv" for name in names)


def test_a_training_set_that_cannot_run_is_refused_by_name():
    with pytest.raises(ValueError, match="trainable must be one of"):
        DistillConfig(trainable="everything")
    with pytest.raises(ValueError, match="hidden_loss_weight needs trainable='swiftkv'"):
        DistillConfig(trainable="upper_layers", hidden_loss_weight=1.0)


def test_training_upper_layers_keeps_the_teacher_the_base_model(tmp_path):
    base = make_base_model("llama", **SHARP)
    data = blocks(40)
    with torch.no_grad():
        teacher_before = base(data[:4]).logits
    model = student()
    trainer = DistillTrainer(model, data[8:], data[:8], quick_config(trainable="upper_layers", max_steps=4,
                                                                     eval_every=4, save_every=4,
                                                                     frozen_cache_gb=0), tmp_path)
    trainer.train()
    assert not torch.equal(model.model.layers[4].mlp.down_proj.weight, base.model.layers[4].mlp.down_proj.weight)
    with torch.no_grad():
        output = trainer.model(data[:4])
    torch.testing.assert_close(output.teacher_logits, teacher_before)


def test_training_all_layers_keeps_the_teacher_the_base_model_and_says_the_base_is_not_kept(tmp_path):
    base = make_base_model("llama", **SHARP)
    data = blocks(40)
    with torch.no_grad():
        teacher_before = base(data[:4]).logits
    model = student()
    config = quick_config(trainable="all_layers", max_steps=4, eval_every=4, save_every=4)
    trainer = DistillTrainer(model, data[8:], data[:8], config, tmp_path)
    trainer.train()
    assert trainer.train_cache is not None and trainer.train_cache.shared is None  # only the teacher is frozen
    for name in ("layers.0.self_attn.q_proj", "layers.1.mlp.up_proj", "layers.4.mlp.down_proj"):
        assert not torch.equal(model.get_submodule(f"model.{name}").weight,
                               base.get_submodule(f"model.{name}").weight), name
    torch.testing.assert_close(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    with torch.no_grad():
        output = trainer.model(data[:4])
    torch.testing.assert_close(output.teacher_logits, teacher_before)
    assert not config.keeps_base_model and DistillConfig().keeps_base_model


def test_shared_layers_give_the_teacher_a_separate_base_model_gives():
    base = make_base_model("llama", **SHARP)
    model = convert_to_swiftkv(base, num_key_value_layers=3)
    input_ids = blocks(2)
    with torch.no_grad():
        shared = DistillationModel(model)(input_ids)
        separate = DistillationModel(model, teacher=base)(input_ids)
    torch.testing.assert_close(shared.teacher_logits, separate.teacher_logits)
    torch.testing.assert_close(shared.student_logits, separate.student_logits)


def test_distillation_lowers_held_out_kl_and_raises_agreement(tmp_path):
    model = student()
    data = blocks(80)
    state = DistillTrainer(model, data[8:], data[:8], quick_config(max_steps=40, eval_every=40, save_every=40,
                                                                   learning_rate=1e-2),
                           tmp_path).train()
    before, after = state.history[0], state.history[-1]
    assert after["eval_kl"] < 0.75 * before["eval_kl"]
    assert after["eval_top1_agreement"] > before["eval_top1_agreement"]


@pytest.mark.parametrize("weighting", ["uniform", "attention"])
@pytest.mark.parametrize("group_size", [1, 2])
def test_least_squares_start_recovers_keys_and_values_that_are_linear_in_the_single_input(family, group_size,
                                                                                         weighting):
    # Layer l's own input is the single input, so its k/v_proj are the exact fit whatever the perturbation
    # and whatever the weighting of the tokens.
    first = 4
    model = convert_to_swiftkv(make_base_model(family, **SHARP), num_key_value_layers=first,
                               key_value_group_size=group_size)
    perturb_swiftkv_weights(model, scale=0.3)
    model.model.norm_swiftkv.weight.data.copy_(model.model.layers[first].input_layernorm.weight)
    attention_implementation = model.config._attn_implementation
    fit = fit_single_input_key_values(model, blocks(48), ridge=1e-10, show_progress=False, weighting=weighting)
    assert model.config._attn_implementation == attention_implementation
    attention = model.model.layers[first].self_attn
    for name in ("k_proj", "v_proj"):
        fitted, exact = getattr(attention, f"{name}_swiftkv"), getattr(attention, name)
        torch.testing.assert_close(fitted.weight, exact.weight, atol=1e-3, rtol=1e-3)
        if exact.bias is not None:
            torch.testing.assert_close(fitted.bias, exact.bias, atol=1e-3, rtol=1e-3)
    assert fit.tokens == 48 * 24
    assert fit.relative_error_after < fit.relative_error_before


def test_weighted_least_squares_ignores_tokens_of_zero_weight():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=generator)
    exact = torch.randn(8, 3, generator=generator)
    y = x @ exact
    y[100:] = torch.randn(100, 3, generator=generator)  # noise on tokens no query attends to
    moments = _Moments(8, 3, bias=False)
    moments.add(x, y, weight=torch.cat([torch.rand(100, generator=generator) + 0.5, torch.zeros(100)]))
    torch.testing.assert_close(moments.solve(ridge=1e-12).float(), exact, atol=1e-4, rtol=1e-4)


def test_least_squares_moments_stay_float32_under_the_trainers_bf16_autocast():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 64, generator=generator), torch.randn(512, 8, generator=generator)
    plain, autocast = _Moments(64, 8, bias=True), _Moments(64, 8, bias=True)
    plain.add(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast.add(x, y)
    torch.testing.assert_close(autocast.xtx, plain.xtx, rtol=0, atol=0)
    torch.testing.assert_close(autocast.xty, plain.xty, rtol=0, atol=0)


def test_attention_received_sums_every_query_row_once_per_layer_and_query_head():
    model = convert_to_swiftkv(make_base_model("llama", **SHARP), num_key_value_layers=4, key_value_group_size=2)
    model.set_attn_implementation("eager")
    received = _AttentionReceived(model)
    with torch.no_grad(), swiftkv_mode(model, enabled=False):
        model(blocks(3, length=10), use_cache=False)
    totals = received.pop()
    received.remove()
    config = model.config
    query_heads_per_kv_head = config.num_attention_heads // config.num_key_value_heads
    assert sorted(totals) == sorted({config.kv_cache_index(i) for i in range(4, config.num_hidden_layers)})
    for total in totals.values():  # [batch, kv_heads, key]; each query's probabilities sum to 1
        assert total.shape == (3, config.num_key_value_heads, 10)
        torch.testing.assert_close(total.sum(-1), torch.full((3, config.num_key_value_heads),
                                                             10.0 * query_heads_per_kv_head * 2))


def test_least_squares_start_is_logged_and_beats_the_paper_copies_on_held_out_kl(tmp_path):
    model = convert_to_swiftkv(make_base_model("llama", **SHARP), num_key_value_layers=3)
    data = blocks(80)
    state = DistillTrainer(model, data[8:], data[:8], quick_config(max_steps=1), tmp_path).train()
    converted, fitted = state.history[0], state.history[1]
    assert (converted["stage"], fitted["stage"]) == ("converted", "least_squares")
    assert fitted["eval_kl"] < converted["eval_kl"]
    assert fitted["key_value_relative_error_after"] < fitted["key_value_relative_error_before"]


@pytest.mark.parametrize("trainable", ["swiftkv", "all_layers"])
def test_cached_teacher_outputs_train_like_recomputing_them_at_every_step(tmp_path, trainable):
    data = blocks(80)
    runs = {}
    for budget_gb in (0.0, 1.0):
        config = quick_config(frozen_cache_gb=budget_gb, trainable=trainable)
        trainer = DistillTrainer(student(), data[8:], data[:8], config, tmp_path / str(budget_gb))
        history = trainer.train().history
        assert (trainer.train_cache is not None) == (budget_gb > 0)
        trained = {name: p.detach().clone() for name, p in trainer.trainable_parameters().items()}
        runs[budget_gb] = trained, [r["eval_kl"] for r in history if "eval_kl" in r]
    (recomputed, recomputed_kl), (cached, cached_kl) = runs[0.0], runs[1.0]
    for name, parameter in recomputed.items():
        torch.testing.assert_close(cached[name], parameter, atol=1e-5, rtol=1e-4)
    assert cached_kl == pytest.approx(recomputed_kl, rel=1e-4)


def test_teacher_outputs_over_the_memory_budget_are_recomputed_at_every_step(tmp_path):
    data = blocks(80)
    trainer = DistillTrainer(student(), data[8:], data[:8], quick_config(max_steps=4, frozen_cache_gb=1e-6),
                             tmp_path)
    history = trainer.train().history
    assert trainer.train_cache is None and trainer.eval_cache is None
    assert [r["frozen_cache_gb"] for r in history if r.get("stage") == "frozen_cache"] == [0.0]
    assert history[-1]["step"] == 4


def test_hidden_state_loss_is_trained_on_with_its_weight(tmp_path):
    with_mse, without_mse = student(), student()
    config = quick_config(max_steps=2, hidden_loss_weight=3.0, hidden_loss_layer=-2)
    state = DistillTrainer(with_mse, blocks(), blocks(8, seed=1), config, tmp_path / "a").train()
    steps = [record for record in state.history if "loss" in record]
    assert len(steps) == 2
    for record in steps:
        assert record["hidden_mse"] > 0
        assert record["loss"] == pytest.approx(record["kl_loss"] + 3.0 * record["hidden_mse"], rel=1e-5)
    DistillTrainer(without_mse, blocks(), blocks(8, seed=1), quick_config(max_steps=2), tmp_path / "b").train()
    trained, reference = trainable_state(with_mse), trainable_state(without_mse)
    assert any(not torch.equal(trained[name], reference[name]) for name in trained)  # its gradient moved them


def test_hidden_state_loss_weighs_an_outlier_channel_like_any_other():
    teacher = torch.randn(64, 8)
    teacher[:, 0] *= 100.0  # an outlier channel of the residual stream
    rms = teacher.pow(2).mean(0).sqrt()
    off_in_outlier, off_in_normal = teacher.clone(), teacher.clone()
    off_in_outlier[:, 0] += 0.5 * rms[0]
    off_in_normal[:, 3] += 0.5 * rms[3]
    assert hidden_state_loss(teacher, teacher) == 0
    assert torch.isclose(hidden_state_loss(off_in_outlier, teacher), hidden_state_loss(off_in_normal, teacher))
    assert torch.isclose(hidden_state_loss(off_in_normal, teacher), torch.tensor(0.25 / 8))


class Interrupted(Exception):
    pass


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    data, eval_data = blocks(), blocks(8, seed=1)
    uninterrupted = student()
    DistillTrainer(uninterrupted, data, eval_data, quick_config(), tmp_path / "a").train()

    def crash_at_step_6(step):
        if step == 6:
            raise Interrupted

    with pytest.raises(Interrupted):
        DistillTrainer(student(), data, eval_data, quick_config(), tmp_path / "b").train(on_step=crash_at_step_6)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000004"]
    resumed = student(seed=99)  # different starting weights: everything must come from the checkpoint
    state = DistillTrainer(resumed, data, eval_data, quick_config(), tmp_path / "b").train(resume=True)
    assert state.step == 12
    for name, tensor in trainable_state(uninterrupted).items():
        assert torch.equal(tensor, trainable_state(resumed)[name]), name


def test_checkpoints_hold_only_safetensors_and_json(tmp_path):
    DistillTrainer(student(), blocks(), blocks(8, seed=1), quick_config(max_steps=4), tmp_path).train()
    files = {path.name for path in (tmp_path / "checkpoints" / "step-000004").iterdir()}
    assert files == {"trainable.safetensors", "optimizer.safetensors", "state.json", "rng-0.safetensors"}


class _Planted:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_refuses_a_checkpoint_with_pickle_files_and_runs_none_of_them(tmp_path):
    DistillTrainer(student(), blocks(), blocks(8, seed=1), quick_config(max_steps=4), tmp_path).train()
    marker = tmp_path / "code-ran"
    import pickle

    (tmp_path / "checkpoints" / "step-000004" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    trainer = DistillTrainer(student(), blocks(), blocks(8, seed=1), quick_config(max_steps=8), tmp_path)
    with pytest.raises(CheckpointError, match="holds pickle files \\(custom_checkpoint_0.pkl\\)"):
        trainer.train(resume=True)
    assert not marker.exists()


def test_resume_says_what_it_resumed_from_or_that_it_starts_fresh(tmp_path, capsys):
    DistillTrainer(student(), blocks(), blocks(8, seed=1), quick_config(max_steps=4), tmp_path / "a").train(
        resume=True)
    assert f"nothing to resume in {tmp_path / 'a' / 'checkpoints'}: starting from step 0" in capsys.readouterr().out
    DistillTrainer(student(), blocks(), blocks(8, seed=1), quick_config(max_steps=6), tmp_path / "a").train(
        resume=True)
    assert f"resumed from {tmp_path / 'a' / 'checkpoints' / 'step-000004'} at step 4" in capsys.readouterr().out


def test_a_truncated_checkpoint_is_named_not_loaded(tmp_path):
    DistillTrainer(student(), blocks(), blocks(8, seed=1), quick_config(max_steps=4), tmp_path).train()
    optimizer_file = tmp_path / "checkpoints" / "step-000004" / "optimizer.safetensors"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])
    trainer = DistillTrainer(student(), blocks(), blocks(8, seed=1), quick_config(max_steps=8), tmp_path)
    with pytest.raises(CheckpointError, match="step-000004 cannot be read"):
        trainer.train(resume=True)


def cli_checkpoint_and_data(tmp_path) -> list[str]:
    """A tiny SwiftKV checkpoint and a text file on disk, as `swiftkv distill` flags."""
    base_dir = tmp_path / "base"
    make_base_model("llama", **SHARP).save_pretrained(base_dir)
    make_tiny_tokenizer().save_pretrained(base_dir)
    model = convert_to_swiftkv(load_model(str(base_dir)), 3)
    save_checkpoint(model, tmp_path / "swiftkv", make_tiny_tokenizer())
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 90}" for j in range(40))}) + "\n"
                            for i in range(200)))
    return ["--model", str(tmp_path / "swiftkv"), "--data", str(data), "--seq-length", "16", "--micro-batch-size",
            "2", "--mixed-precision", "no"]


def test_killed_cli_run_resumes_from_its_last_checkpoint(tmp_path):
    command = [sys.executable, "-m", "swiftkv.cli", "distill", *cli_checkpoint_and_data(tmp_path),
               "--max-steps", "3000", "--save-every", "5", "--eval-every", "1000"]
    env = {**os.environ, "SWIFTKV_NO_COMPILE": "1"}
    process = subprocess.Popen(command + ["--out", str(tmp_path / "run")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while not list(checkpoints.glob("step-*")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = int(sorted(checkpoints.glob("step-*"))[-1].name.split("-")[1])
    assert 0 < killed_at < 3000
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    result = subprocess.run(command + ["--out", str(tmp_path / "run"), "--resume", "--max-steps",
                                       str(killed_at + 10)], env=env, capture_output=True, text=True)
    # --max-steps changes the schedule, so only continuity is checked here; exactness is the test above
    assert result.returncode == 0, result.stderr
    resumed = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["step"] for r in resumed if "loss" in r][killed_at - 1:] == list(range(killed_at, killed_at + 11))
    assert resumed[:killed_at] == history[:killed_at]
    assert load_model(str(tmp_path / "run" / "model")).config.swiftkv is True


def test_two_data_parallel_processes_share_one_least_squares_fit(tmp_path):
    """Under torchrun (gloo on CPU; NCCL on GPUs) each process fits K/V on its half of the blocks and the
    summed moments give exactly the one-process fit; training and saving then run as usual."""
    flags = cli_checkpoint_and_data(tmp_path) + ["--max-steps", "2", "--eval-every", "2", "--save-every", "2"]
    env = {**os.environ, "SWIFTKV_NO_COMPILE": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "swiftkv.cli"]
    one = subprocess.run([sys.executable, "-m", "swiftkv.cli", "distill", *flags, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    two = subprocess.run([*torchrun, "distill", *flags, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]

    def fit(run):
        history = json.loads((tmp_path / run / "history.json").read_text())
        return next(row for row in history if row.get("stage") == "least_squares")

    assert fit("two")["least_squares_tokens"] == fit("one")["least_squares_tokens"]
    assert fit("two")["eval_kl"] == pytest.approx(fit("one")["eval_kl"], rel=1e-5)
    assert fit("two")["key_value_relative_error_after"] == pytest.approx(fit("one")["key_value_relative_error_after"],
                                                                         rel=1e-5)
    assert json.loads((tmp_path / "two" / "distill_config.json").read_text())["max_steps"] == 2
    assert load_model(str(tmp_path / "two" / "model")).config.swiftkv is True


def test_compiled_loss_matches_eager(monkeypatch):
    monkeypatch.delenv("SWIFTKV_NO_COMPILE", raising=False)
    compiled = _CompiledWithFallback(_kl_teacher_student)
    student_logits = torch.randn(2, 5, 96, requires_grad=True)
    teacher_logits = torch.randn(2, 5, 96) * 3
    torch.testing.assert_close(compiled(student_logits, teacher_logits, 2.0),
                               _kl_teacher_student(student_logits, teacher_logits, 2.0))
    assert compiled.compiled is not None, "torch.compile fell back to eager"
    torch.testing.assert_close(logits_distillation_loss(student_logits, teacher_logits, 2.0),
                               _kl_teacher_student(student_logits, teacher_logits, 2.0))


def test_teacher_corpus_is_shared_across_swiftkv_settings_of_one_base_model():
    """The teacher runs with swiftkv off, so l and the group size must not force a new corpus."""
    base = make_base_model("llama")
    fingerprints = {teacher_fingerprint(convert_to_swiftkv(base, l, g)) for l, g in ((3, 1), (4, 2), (2, 1))}
    assert len(fingerprints) == 1
    assert teacher_fingerprint(convert_to_swiftkv(make_base_model("llama", seed=1), 3, 1)) not in fingerprints


def test_more_answers_per_prompt_add_new_rounds_and_reuse_the_cached_ones(tmp_path):
    teacher = convert_to_swiftkv(make_base_model("llama"), 3, 1)
    teacher.config.swiftkv = False
    tokenizer = make_tiny_tokenizer()
    one = teacher_corpus(teacher, tokenizer, num_prompts=6, max_new_tokens=4, samples_per_prompt=1, cache_dir=tmp_path)
    two = teacher_corpus(teacher, tokenizer, num_prompts=6, max_new_tokens=4, samples_per_prompt=2, cache_dir=tmp_path)
    assert two[:6] == one and [r["prompt"] for r in two[6:]] == [r["prompt"] for r in one]
    assert [r["response"] for r in two[6:]] != [r["response"] for r in one]  # differently seeded answers
    assert len(list(tmp_path.glob("teacher-corpus-*.jsonl"))) == 2


def tiny_teacher():
    teacher = convert_to_swiftkv(make_base_model("llama"), 3, 1)
    teacher.config.swiftkv = False
    return teacher


def test_free_text_continues_built_in_openings_without_the_chat_template_and_is_cached(tmp_path, monkeypatch):
    teacher, tokenizer = tiny_teacher(), make_tiny_tokenizer()
    records = free_text_corpus(teacher, tokenizer, 5, max_new_tokens=4, cache_dir=tmp_path)
    assert [r["text"][:len(o)] for r, o in zip(records, free_text_openings())] == free_text_openings()[:5]
    assert all(set(r) == {"text"} and "<|im_start|>" not in r["text"] for r in records)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the cached texts were not reused")

    monkeypatch.setattr(corpus, "sample_continuations", no_teacher)
    assert free_text_corpus(teacher, tokenizer, 5, max_new_tokens=4, cache_dir=tmp_path) == records
    monkeypatch.undo()
    free_text_corpus(teacher, tokenizer, 5, max_new_tokens=6, cache_dir=tmp_path)           # other settings
    free_text_corpus(convert_to_swiftkv(make_base_model("llama", seed=1), 3, 1), tokenizer, 5, max_new_tokens=4,
                     cache_dir=tmp_path)                                                      # another teacher
    assert len(list(tmp_path.glob("teacher-free-text-*.jsonl"))) == 3
    assert not list(tmp_path.glob("teacher-corpus-*"))


@pytest.mark.parametrize("ratio, free_texts", [(0.0, 0), (0.25, 2), (0.5, 6)])
def test_the_free_text_ratio_is_the_share_of_raw_text_in_the_default_corpus(tmp_path, monkeypatch, ratio,
                                                                           free_texts):
    monkeypatch.setenv("SWIFTKV_CACHE", str(tmp_path))
    config = DistillConfig(corpus_prompts=6, corpus_max_new_tokens=4, corpus_free_text_ratio=ratio)
    records = load_records(["default"], tiny_teacher, make_tiny_tokenizer(), config)
    assert config.corpus_free_texts == free_texts
    assert sum("text" in r for r in records) == free_texts and sum("response" in r for r in records) == 6


def test_raw_texts_have_their_own_length(tmp_path, monkeypatch):
    """`corpus_free_text_max_new_tokens` sets how far the teacher continues each raw text, not the chat answers."""
    monkeypatch.setenv("SWIFTKV_CACHE", str(tmp_path))
    lengths = {}

    def recording(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, seed, desc):
        lengths[desc] = max_new_tokens
        return ["w1 w2"] * len(prompts)

    monkeypatch.setattr(corpus, "sample_continuations", recording)
    config = DistillConfig(corpus_prompts=2, corpus_max_new_tokens=4, corpus_free_text_max_new_tokens=12)
    load_records(["default"], tiny_teacher, make_tiny_tokenizer(), config)
    assert lengths == {"teacher corpus": 4, "teacher free text": 12}


def test_no_evaluation_text_enters_training(tmp_path, monkeypatch):
    """A record that copies 13 words of an evaluation set is left out of training and held-out data alike;
    12 shared words are an ordinary phrase."""
    passage = " ".join(f"w{i}" for i in range(40, 60))  # 20 words of the tiny vocabulary
    data = tmp_path / "data"
    data.mkdir()
    (data / "lambada_openai.jsonl").write_text(json.dumps({"text": passage}) + "\n")
    (data / "wikitext2_test_raw.txt").write_text("an unrelated article about rivers and the sea")
    monkeypatch.setenv("SWIFTKV_DATA_DIR", str(data))
    words = passage.split()
    planted = {"prompt": "w1 w2", "response": "w3 " + " ".join(words[2:15]) + " w4"}
    ordinary = {"text": "w5 " + " ".join(words[:12]) + " w6"}
    kept, caught = drop_evaluation_text([planted, ordinary])
    assert kept == [ordinary] and caught == {"lambada_openai.jsonl": 1}

    train_file = tmp_path / "train.jsonl"
    clean = [{"prompt": f"w{i} w{i + 1}", "response": " ".join(f"w{i + j}" for j in range(8))} for i in range(30)]
    train_file.write_text("".join(json.dumps(r) + "\n" for r in [planted, *clean]))
    tokenizer = make_tiny_tokenizer()
    records, train, held_out = distillation_blocks([str(train_file)], "unused", tokenizer,
                                                   DistillConfig(seq_length=8, eval_fraction=0.1))
    assert planted not in records and len(records) == 30
    planted_ids = set(tokenizer(" ".join(words[2:15]), add_special_tokens=False).input_ids)  # not in `clean`
    assert len(planted_ids) == 13 and not planted_ids & (set(train.flatten().tolist()) | set(held_out.flatten().tolist()))


def test_text_file_documents_are_split_at_blank_lines_that_hold_spaces(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first document\nstill first\n  \nsecond\n\t\n\nthird\r\n \r\nfourth\n")
    assert [r["text"] for r in read_records(path)] == ["first document\nstill first", "second", "third", "fourth"]


def test_packing_keeps_every_token_in_order_without_padding():
    packed = pack_sequences([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], block_length=4)
    assert packed.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_held_out_records_are_never_trained_on():
    tokenizer = make_tiny_tokenizer()
    records = [{"text": " ".join([f"w{i}"] * 8)} for i in range(40)]
    train, held_out = train_eval_blocks(records, tokenizer, block_length=9, eval_fraction=0.1, seed=0)
    assert not set(train.flatten().tolist()) & (set(held_out.flatten().tolist()) - {tokenizer.eos_token_id})


def test_growing_the_corpus_never_trains_on_a_smaller_corpus_held_out_prompts():
    records = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(400)]
    more = records + [{"prompt": f"question {i}", "response": "another answer"} for i in range(400)]
    _, small_held_out = split_records(records, eval_fraction=0.05, seed=0)
    large_train, large_held_out = split_records(more, eval_fraction=0.05, seed=0)
    held_out_prompts = {r["prompt"] for r in small_held_out}
    assert 5 <= len(small_held_out) <= 40
    assert held_out_prompts == {r["prompt"] for r in large_held_out}
    assert not held_out_prompts & {r["prompt"] for r in large_train}
    assert len(split_records(records[:3], eval_fraction=0.05, seed=0)[1]) == 1


def test_chat_records_are_formatted_with_the_chat_template():
    tokenizer = make_tiny_tokenizer()
    ids = encode_record({"prompt": "w1 w2", "response": "w3"}, tokenizer)
    assert tokenizer.decode(ids) == "<|im_start|> user w1 w2 <|im_end|> <|im_start|> assistant w3 <|im_end|>"


def test_builtin_prompts_are_several_hundred_and_distinct():
    prompts = builtin_prompts()
    assert len(prompts) >= 500 and len(set(prompts)) == len(prompts)


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": broken}\n', r"data\.jsonl:2: not valid JSON"),
    ('{"text": "ok"}\n{"label": 1}\n', r"data\.jsonl:2: a record needs 'messages', 'text' or 'prompt'"),
    ('["not an object"]\n', r"data\.jsonl:1: expected a JSON object"),
])
def test_bad_data_file_names_the_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_unsupported_data_file_type_is_named(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported data file type '\.csv'"):
        read_records(path)
