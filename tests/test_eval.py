"""Quality evaluation: known-answer scoring, self-fidelity, clear task-file errors, lm-eval adapter."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from swiftkv.checkpoint import save_checkpoint
from swiftkv.convert import convert_to_swiftkv
from swiftkv.eval.fidelity import measure_fidelity, token_kl_and_agreement
from swiftkv.eval.perplexity import window_negative_log_likelihoods
from swiftkv.eval.runner import Candidate, evaluate_fidelity, evaluate_likelihood_task, perplexity_aggregate
from swiftkv.eval.scoring import score_continuations
from swiftkv.eval.statistics import bootstrap, paired_difference
from swiftkv.eval.tasks import Task, TaskFormatError, load_multiple_choice, resolve_task

from conftest import TINY, make_base_model, make_tiny_tokenizer, perturb_swiftkv_weights

LOG_VOCAB = math.log(TINY["vocab_size"])


def uniform_model():
    """A real Llama whose output head is zero: every next token has probability 1/vocab exactly."""
    model = make_base_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_continuation_logprob_under_a_uniform_model_is_known():
    scores = score_continuations(uniform_model(), make_tiny_tokenizer(), [("w1 w2", " w3"), ("w1", " w4 w5 w6")])
    assert [s.num_tokens for s in scores] == [1, 3]
    assert scores[0].logprob == pytest.approx(-LOG_VOCAB, rel=1e-5)
    assert scores[1].logprob == pytest.approx(-3 * LOG_VOCAB, rel=1e-5)


def test_forced_multiple_choice_gives_the_expected_raw_and_normalized_accuracy(tmp_path):
    # Uniform model: log-likelihood = -tokens * log(V). Raw accuracy picks the fewest tokens (" w1", wrong);
    # length-normalized accuracy picks the most bytes per token (" w10 w11", right).
    path = write_jsonl(tmp_path / "forced.jsonl", [
        {"id": str(i), "context": "w2 w3", "choices": ["w1", "w10 w11"], "label": 1} for i in range(6)])
    result = evaluate_likelihood_task(Candidate("uniform", uniform_model()), make_tiny_tokenizer(),
                                      Task("forced", "multiple_choice", path), limit=None, batch_size=4)
    assert result.num_examples == 6
    assert result.metrics["acc"].values == [0.0] * 6
    assert result.metrics["acc_norm"].values == [1.0] * 6


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    token_ids = torch.randint(3, 96, (300,), generator=torch.Generator().manual_seed(0))
    windows = window_negative_log_likelihoods(uniform_model(), token_ids, window=64, stride=32)
    assert sum(tokens for _, tokens in windows) == 299  # every token but the first, scored once
    assert perplexity_aggregate(torch.tensor(windows).numpy()) == pytest.approx(96, rel=1e-4)


def test_a_model_evaluated_against_itself_has_kl_zero_and_agreement_one(tmp_path):
    model = convert_to_swiftkv(make_base_model("llama"), 3)
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"id": str(i), "prompt": " ".join(f"w{(i * 5 + j) % 80}" for j in range(3 + i))}
                           for i in range(5)])
    candidate = Candidate("swiftkv", model, True)
    result = evaluate_fidelity(candidate, Candidate("swiftkv-again", model, True), make_tiny_tokenizer(),
                               Task("self", "fidelity", prompts), limit=None, batch_size=3, max_new_tokens=6)
    assert max(result.metrics["kl"].values) < 1e-6
    assert result.metrics["top1_agreement"].values == [1.0] * 5
    assert result.metrics["greedy_exact_match"].values == [1.0] * 5


def test_untrained_swiftkv_is_less_faithful_than_itself(tmp_path):
    model = convert_to_swiftkv(make_base_model("llama", initializer_range=0.25), 3)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"w{i} w{i + 1} w{i + 2}"} for i in range(4)])
    result = evaluate_fidelity(Candidate("swiftkv", model, True), Candidate("base", model, False),
                               make_tiny_tokenizer(), Task("p", "fidelity", prompts), None, 4, 6)
    assert min(result.metrics["kl"].values) > 1e-3


def test_paired_difference_of_identical_results_is_exactly_zero():
    values = [1.0, 0.0, 1.0, 1.0, 0.0]
    difference = paired_difference(values, values)
    assert (difference.value, difference.low, difference.high) == (0.0, 0.0, 0.0)
    assert bootstrap(values).low <= 0.6 <= bootstrap(values).high


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": ["x", "y"], "label": 0}\n{"context": "a", "choices": ["x"], "label": 0}',
     r"bad\.jsonl:2: 'choices' must be a list of at least two strings"),
    ('{"context": "a", "choices": ["x", "y"], "label": 5}', r"bad\.jsonl:1: label 5 is not an index into 2 choices"),
    ('{"context": "a", "choices": ["x", "y"]}', r"bad\.jsonl:1: missing field 'label'"),
    ('{"context": "a", "choices": ["x", "y"], "label": 0}\n\n{oops', r"bad\.jsonl:3: not valid JSON"),
])
def test_malformed_task_file_names_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(TaskFormatError, match=message):
        load_multiple_choice(path)


def test_unknown_task_lists_the_builtin_ones():
    with pytest.raises(TaskFormatError, match="unknown task 'nope'.*hellaswag"):
        resolve_task("nope")


def test_user_task_file_format_is_detected(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"context": "a", "choices": ["x", "y"], "label": 0}])
    assert resolve_task(str(path)).kind == "multiple_choice"


@pytest.fixture
def tiny_swiftkv_dir(tmp_path):
    model = convert_to_swiftkv(make_base_model("llama", initializer_range=0.25), 3)
    return save_checkpoint(model, tmp_path / "swiftkv", make_tiny_tokenizer())


def test_eval_cli_writes_the_side_by_side_table(tiny_swiftkv_dir, tmp_path):
    task = write_jsonl(tmp_path / "mc.jsonl", [{"context": f"w{i} w{i + 1}", "choices": [f"w{i + 2}", f"w{i + 9}"],
                                                "label": 0} for i in range(10)])
    result = subprocess.run([sys.executable, "-m", "swiftkv.cli", "eval", "--model", str(tiny_swiftkv_dir),
                             "--tasks", str(task), "--dtype", "float32", "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert [(row["task"], row["metric"]) for row in report["rows"]] == [("mc", "acc"), ("mc", "acc_norm")]
    assert report["settings"]["task_files"] == {"mc": str(task)}  # a report says which data it scored
    row = report["rows"][0]
    assert row["baseline"]["value"] + row["difference"]["value"] == pytest.approx(row["model"]["value"])
    assert "| mc | acc | 10 |" in (tmp_path / "report" / "eval.md").read_text()


def test_a_checkpoint_whose_layers_were_distilled_is_compared_with_its_base_model_only(tmp_path):
    from swiftkv.eval import SAME_CHECKPOINT, baseline_for, evaluate

    model = convert_to_swiftkv(make_base_model("llama"), 3)
    model.config.swiftkv_base_preserved = False  # as `swiftkv distill --trainable upper_layers` saves it
    folder = save_checkpoint(model, tmp_path / "swiftkv", make_tiny_tokenizer())
    task = write_jsonl(tmp_path / "mc.jsonl", [{"context": "w1 w2", "choices": ["w3", "w9"], "label": 0}])
    with pytest.raises(ValueError, match="pass the base model as --baseline"):
        evaluate(str(folder), [str(task)], SAME_CHECKPOINT, dtype="float32")
    assert baseline_for("base", "upper_layers") == baseline_for("base", "all_layers") == "base"
    assert baseline_for("base", "swiftkv") == SAME_CHECKPOINT


def test_lm_eval_harness_scores_a_local_task_like_swiftkv_eval(tiny_swiftkv_dir, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from swiftkv.eval.lm_eval_adapter import SwiftKVLM

    records = [{"context": f"w{i} w{i + 1}", "choices": [f"w{i + 2}", f"w{i + 9}", f"w{i + 4}"], "label": i % 3}
               for i in range(12)]
    data = write_jsonl(tmp_path / "local.jsonl", records)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_mc.yaml").write_text(
        "task: local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "target_delimiter: \" \"\nmetric_list:\n  - metric: acc\n")
    lm = SwiftKVLM(pretrained=str(tiny_swiftkv_dir), swiftkv=True, dtype="float32", batch_size=4, device="cpu")
    results = simple_evaluate(model=lm, tasks=["local_mc"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    lm_eval_accuracy = results["results"]["local_mc"]["acc,none"]

    from swiftkv.loading import load_model
    model = load_model(str(tiny_swiftkv_dir), dtype="float32")
    ours = evaluate_likelihood_task(Candidate("swiftkv", model, True), make_tiny_tokenizer(),
                                    Task("local", "multiple_choice", data), None, 4)
    assert lm_eval_accuracy == pytest.approx(sum(ours.metrics["acc"].values) / len(records))


def test_kl_and_agreement_per_position_are_the_textbook_quantities():
    teacher, student = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    kl, agreement = token_kl_and_agreement(teacher, student)
    expected_kl = torch.nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                             reduction="none").sum(-1)
    torch.testing.assert_close(kl, expected_kl)
    assert torch.equal(agreement, (teacher.argmax(-1) == student.argmax(-1)).float())
    same_kl, same_agreement = token_kl_and_agreement(teacher, teacher)
    assert same_kl.abs().max() < 1e-6 and same_agreement.all()


def test_fidelity_and_the_distillation_trainer_measure_the_same_agreement_and_kl(tmp_path):
    from swiftkv.distill import DistillConfig
    from swiftkv.distill.trainer import DistillTrainer

    student = convert_to_swiftkv(make_base_model("llama"), num_key_value_layers=3)
    perturb_swiftkv_weights(student, scale=0.3)
    blocks = torch.randint(3, 96, (6, 24), generator=torch.Generator().manual_seed(0))
    config = DistillConfig(max_steps=1, seq_length=24, micro_batch_size=2, mixed_precision="no")
    trained_on = DistillTrainer(student, blocks, blocks, config, tmp_path).evaluate()
    fidelity = measure_fidelity(student, blocks)
    assert fidelity.top1_agreement == pytest.approx(trained_on["eval_top1_agreement"])
    assert fidelity.kl == pytest.approx(trained_on["eval_kl"], rel=1e-4)
    assert 0 < fidelity.top1_agreement < 1 and fidelity.num_tokens == blocks.numel()
