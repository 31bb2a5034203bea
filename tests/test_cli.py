"""The `swiftkv` command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from swiftkv.loading import load_model, load_tokenizer


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "swiftkv.cli", *args], capture_output=True, text=True, timeout=300)


def test_convert_writes_a_loadable_checkpoint_with_tokenizer(tiny_base_dir, tmp_path):
    out = tmp_path / "swiftkv"
    result = run_cli("convert", "--model", str(tiny_base_dir), "--num-key-value-layers", "0.5",
                     "--key-value-group-size", "3", "--dtype", "bfloat16", "--out", str(out))
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_key_value_layers"], config["key_value_group_size"]) == ("llama_swiftkv", 3, 3)
    model = load_model(str(out))
    assert model.dtype == torch.bfloat16
    tokenizer = load_tokenizer(str(out))
    input_ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    assert model.generate(input_ids, max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_convert_reports_an_impossible_layout_without_traceback(tiny_base_dir, tmp_path):
    result = run_cli("convert", "--model", str(tiny_base_dir), "--num-key-value-layers", "3",
                     "--key-value-group-size", "2", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "key_value_group_size" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_convert_reports_a_missing_model_path(tmp_path):
    result = run_cli("convert", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_distill_out_pointing_at_a_file_is_one_line_error(tmp_path):
    from test_distill import cli_checkpoint_and_data

    (tmp_path / "taken").write_text("not a folder")
    result = run_cli("distill", *cli_checkpoint_and_data(tmp_path), "--out", str(tmp_path / "taken"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"swiftkv distill: error: --out {tmp_path / 'taken'} is a file; give a folder " \
                                    "(it is created if missing)"


def test_distill_resume_with_nothing_to_resume_says_it_starts_fresh(tmp_path):
    from test_distill import cli_checkpoint_and_data

    result = subprocess.run([sys.executable, "-m", "swiftkv.cli", "distill", *cli_checkpoint_and_data(tmp_path),
                             "--out", str(tmp_path / "run"), "--resume", "--max-steps", "2",
                             "--least-squares-blocks", "0"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "SWIFTKV_NO_COMPILE": "1"})
    assert result.returncode == 0, result.stderr
    assert f"nothing to resume in {tmp_path / 'run' / 'checkpoints'}: starting from step 0" in result.stdout + result.stderr


def test_device_flag_runs_generate_on_the_chosen_device_and_names_one_this_machine_lacks(tiny_base_dir):
    result = run_cli("generate", str(tiny_base_dir), "w1 w2", "--device", "cpu", "--max-tokens", "3",
                     "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    if not torch.cuda.is_available():
        result = run_cli("generate", str(tiny_base_dir), "w1 w2", "--device", "cuda")
        assert result.returncode == 2 and "sees no CUDA GPU" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("eval", "--model", str(tiny_base_dir), "--device", "tpu", "--baseline", "none")
    assert result.returncode == 2 and "use auto, cpu, cuda or cuda:N" in result.stderr


def test_auto_device_is_cuda_exactly_when_present():
    from swiftkv.loading import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
