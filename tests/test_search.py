"""`swiftkv search`: the frontier over depths, the pick within a quality budget, and resuming a killed search."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import swiftkv.eval
from swiftkv import search
from swiftkv.distill import DistillConfig
from swiftkv.search import SearchConfig, default_depths, pick, quality_drops, run_search, search_points


def row(point, speedup, **drops):
    depth, group = (int(part[1:]) for part in point.split("-"))
    return {"point": point, "prefill_compute_saved": (30 - depth) / 30, "ttft_speedup": speedup, "drop_points": drops,
            "worst_drop_points": max(drops.values())}


def test_the_picker_chooses_the_fastest_point_whose_every_task_is_within_budget():
    frontier = [row("l10-g1", 2.4, arc_easy=3.0, lambada=0.5),   # fastest, but one task over budget
                row("l15-g1", 1.9, arc_easy=0.8, lambada=-0.2),
                row("l20-g1", 1.4, arc_easy=0.1, lambada=0.0),
                row("l24-g1", 1.2, arc_easy=-0.5, lambada=0.0)]
    assert pick(frontier, 1.0)["point"] == "l15-g1"
    assert pick(frontier, 0.2)["point"] == "l20-g1"
    assert pick(frontier, 0.05)["point"] == "l24-g1"
    assert pick(frontier, 5.0)["point"] == "l10-g1"
    assert pick(frontier, -1.0) is None


def test_the_picker_ranks_by_prefill_skipped_before_a_noisy_timing_and_by_timing_within_one_depth():
    frontier = [row("l24-g1", 1.05, arc_easy=0.5), row("l28-g1", 1.07, arc_easy=0.2),  # timings out of order
                row("l20-g1", 1.50, arc_easy=0.9), row("l20-g2", 1.62, arc_easy=0.9)]
    assert pick(frontier, 0.6)["point"] == "l24-g1"
    assert pick(frontier, 1.0)["point"] == "l20-g2"  # AcrossKV at the same depth: the measured faster one


def test_the_frontier_says_when_the_chosen_point_was_not_measurably_faster_than_the_base():
    def result(speedup):
        point = {**row("l28-g1", speedup, arc_easy=0.8), "serving_speedup": 1.0,
                 "held_out_agreement": 0.98, "drop_ci95_points": {"arc_easy": (0.8, 0.0, 1.8)}, "eval_rows": []}
        return {"model": "m", "settings": {"max_quality_drop": 1.0}, "points": [point], "chosen": "l28-g1"}

    slower = search.render_frontier(result(0.99))
    assert "Chosen: **l28-g1**. Its TTFT in this run, 0.99x the base's, is not measurably faster" in slower
    assert "(7%) is within the timing noise" in slower
    assert "not measurably faster" not in search.render_frontier(result(1.06))


def test_the_budget_counts_acc_norm_where_a_task_has_it_and_acc_otherwise():
    def eval_row(task, metric, difference):
        return {"task": task, "metric": metric, "difference": {"value": difference}}

    rows = [eval_row("arc_easy", "acc", -0.10), eval_row("arc_easy", "acc_norm", -0.02),
            eval_row("lambada", "acc", 0.01), eval_row("wikitext2", "perplexity", 30.0),
            {"task": "vicuna_bench", "metric": "top1_agreement", "difference": None}]
    assert quality_drops(rows) == pytest.approx({"arc_easy": 2.0, "lambada": -1.0})


def test_default_depths_and_points_follow_the_layer_count_and_valid_group_sizes():
    assert default_depths(30) == [10, 15, 20, 24, 28]
    assert default_depths(32) == [11, 16, 21, 26, 30]
    points = search_points(SearchConfig(depths=[3, 4], group_sizes=[1, 2]), num_layers=6)
    assert [p.name for p in points] == ["l3-g1", "l4-g1", "l4-g2"]  # 6 - 3 layers do not split in pairs
    with pytest.raises(ValueError, match="no valid point"):
        search_points(SearchConfig(depths=[6]), num_layers=6)


def tiny_eval_data(folder):
    folder.mkdir()
    (folder / "arc_easy.jsonl").write_text("".join(
        json.dumps({"id": str(i), "context": f"w{i} w{i + 3}", "choices": [f"w{i + 5}", f"w{i + 7}"], "label": 0})
        + "\n" for i in range(6)))
    (folder / "lambada_openai.jsonl").write_text("".join(
        json.dumps({"text": " ".join(f"w{i + j}" for j in range(8))}) + "\n" for i in range(6)))
    return folder


def test_a_killed_search_resumes_without_redoing_finished_points(tiny_base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SWIFTKV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SWIFTKV_NO_COMPILE", "1")
    monkeypatch.setenv("SWIFTKV_DATA_DIR", str(tiny_eval_data(tmp_path / "data")))
    config = SearchConfig(depths=[2, 4], tasks=["arc_easy", "lambada"], eval_limit=4, ttft_tokens=32,
                          serving_requests=2, serving_output_tokens=4, serving_rate=100.0, max_quality_drop=100.0,
                          kv_cache_memory_gb=0.01, speed_rounds=2)
    distill_config = DistillConfig(corpus_prompts=40, corpus_max_new_tokens=8, max_steps=2, seq_length=16,
                                   micro_batch_size=2, eval_fraction=0.2, mixed_precision="no")
    out = tmp_path / "search"
    evaluate, builds, evaluations = swiftkv.eval.evaluate, [], []

    def killed_at_the_second_evaluation(model, *args, **kwargs):
        evaluations.append(model)
        if len(evaluations) == 2:
            raise KeyboardInterrupt  # as if the process were killed here
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(swiftkv.eval, "evaluate", killed_at_the_second_evaluation)
    with pytest.raises(KeyboardInterrupt):
        run_search(str(tiny_base_dir), out, config, distill_config)
    assert (out / "points" / "l2-g1" / "quality" / "eval.json").is_file()
    assert (out / "points" / "l4-g1" / "report.json").is_file() and not (out / "frontier.json").exists()

    build = search.run_build
    monkeypatch.setattr(search, "run_build", lambda *args, **kwargs: builds.append(args) or build(*args, **kwargs))
    evaluations.clear()
    monkeypatch.setattr(swiftkv.eval, "evaluate", lambda model, *a, **k: evaluations.append(model) or evaluate(model, *a, **k))
    result = run_search(str(tiny_base_dir), out, config, distill_config)
    assert builds == [] and evaluations == [str(out / "points" / "l4-g1" / "model")]  # only the unfinished stage
    assert [p["point"] for p in result["points"]] == ["l2-g1", "l4-g1"]
    assert {"arc_easy", "lambada"} == set(result["points"][0]["drop_points"])
    assert (out / "model").resolve() == (out / "points" / result["chosen"] / "model").resolve()
    assert "| l2-g1 | 67% |" in (out / "frontier.md").read_text() and (out / "frontier.png").stat().st_size > 0
    assert len(list((tmp_path / "cache").glob("teacher-corpus-*.jsonl"))) == 1  # one corpus for every point
    rounds = json.loads((out / "speed.json").read_text())["rounds"]  # every system timed once per round
    assert {name: len(times["ttft_s"]) for name, times in rounds.items()} == {"base": 2, "l2-g1": 2, "l4-g1": 2}


def test_a_search_under_two_data_parallel_processes_distills_in_both_and_evaluates_once(tiny_base_dir, tmp_path):
    """torchrun (gloo on CPU; NCCL on GPUs): every process distills each point, the main process alone
    converts first, evaluates, times and writes the frontier."""
    env = {**os.environ, "SWIFTKV_CACHE": str(tmp_path / "cache"), "SWIFTKV_NO_COMPILE": "1",
           "SWIFTKV_DATA_DIR": str(tiny_eval_data(tmp_path / "data")), "ACCELERATE_USE_CPU": "true",
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "search"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "swiftkv.cli", "search",
         "--model", str(tiny_base_dir), "--out", str(out), "--depths", "2", "4", "--tasks", "arc_easy", "lambada",
         "--eval-limit", "4", "--ttft-tokens", "32", "--serving-requests", "2", "--max-quality-drop", "100",
         "--corpus-prompts", "40", "--corpus-max-new-tokens", "8", "--max-steps", "2", "--seq-length", "16",
         "--micro-batch-size", "2", "--eval-fraction", "0.2", "--mixed-precision", "no"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    frontier = json.loads((out / "frontier.json").read_text())
    assert [p["point"] for p in frontier["points"]] == ["l2-g1", "l4-g1"] and (out / "model").is_dir()
    assert result.stdout.count("== l2-g1: quality") == 1  # the main process only
    history = json.loads((out / "points" / "l4-g1" / "history.json").read_text())
    assert history[-1]["step"] == 2


def test_a_search_without_its_evaluation_data_fails_before_any_distillation(tiny_base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SWIFTKV_DATA_DIR", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="arc_easy"):
        run_search(str(tiny_base_dir), tmp_path / "search", SearchConfig(depths=[2], tasks=["arc_easy"]))
    assert not (tmp_path / "search" / "points").exists()
