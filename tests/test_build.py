"""`swiftkv build`, the main job, end to end on a tiny model (the real one runs in benchmarks/distill.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from swiftkv.loading import load_model


def test_build_converts_distills_evaluates_and_reports(tiny_base_dir, tmp_path):
    data = tmp_path / "data"  # the evaluation sets the build uses, in their formats, over the tiny vocabulary
    data.mkdir()
    (data / "prompts_vicuna_bench.jsonl").write_text("".join(
        json.dumps({"id": str(i), "prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(5)))
    (data / "arc_easy.jsonl").write_text("".join(
        json.dumps({"id": str(i), "context": f"w{i} w{i + 3}", "choices": [f"w{i + 5}", f"w{i + 7}"], "label": 0}) + "\n"
        for i in range(5)))
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "swiftkv.cli", "build", "--model", str(tiny_base_dir), "--out", str(out),
         "--num-key-value-layers", "3", "--corpus-prompts", "40", "--corpus-max-new-tokens", "8",
         "--max-steps", "4", "--seq-length", "16", "--micro-batch-size", "2", "--eval-fraction", "0.2",
         "--eval-limit", "3"],
        env={**os.environ, "SWIFTKV_CACHE": str(tmp_path / "cache"), "SWIFTKV_NO_COMPILE": "1",
             "SWIFTKV_DATA_DIR": str(data)},
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 4 and report["eval_top1_agreement_after"] is not None
    markdown = (out / "report.md").read_text()
    assert "top-1 agreement with base" in markdown and "| vicuna_bench | top1_agreement | 3 |" in markdown
    assert (out / "learning_curve.png").stat().st_size > 0
    assert len(list((tmp_path / "cache").glob("teacher-corpus-*.jsonl"))) == 1
    model = load_model(str(out / "model"))
    assert model.config.swiftkv and model.config.num_key_value_layers == 3
