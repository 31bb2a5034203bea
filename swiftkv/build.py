"""`swiftkv build`: the main job. Convert a base model, generate the default data with the teacher,
distill, evaluate, and write a short report — on the embedded SmolLM2 by default."""

from __future__ import annotations

import json
import time
from pathlib import Path

from swiftkv.checkpoint import CheckpointError, validate_checkpoint
from swiftkv.convert import convert_checkpoint
from swiftkv.distill import DistillConfig, distill
from swiftkv.distill.report import plot_learning_curve, summarize


def run_build(model: str, out_dir: str | Path, num_key_value_layers: str | float = 0.5,
              key_value_group_size: int = 1, config: DistillConfig | None = None, resume: bool = False,
              corpus_prompts: int = 512, corpus_max_new_tokens: int = 128) -> dict:
    """Run every stage (a stage whose output is already complete is reused); return the report dict."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    converted = out_dir / "converted"
    try:
        validate_checkpoint(converted)
        print(f"[1/3] reusing converted checkpoint {converted}")
    except CheckpointError:
        print(f"[1/3] converting {model} (num_key_value_layers={num_key_value_layers}, "
              f"key_value_group_size={key_value_group_size})")
        convert_checkpoint(model, converted, num_key_value_layers, key_value_group_size)
    print("[2/3] teacher corpus + distillation")
    final, state = distill(str(converted), out_dir, config=config, resume=resume, corpus_prompts=corpus_prompts,
                           corpus_max_new_tokens=corpus_max_new_tokens)
    print("[3/3] report")
    report = {"base_model": model, "checkpoint": str(final), "num_key_value_layers": num_key_value_layers,
              "key_value_group_size": key_value_group_size, **summarize(state.history),
              "wall_seconds": time.perf_counter() - started}
    plot_learning_curve(state.history, out_dir / "learning_curve.png", title=f"SwiftKV distillation of {model}")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(render_report(report))
    print(render_report(report))
    return report


def render_report(report: dict) -> str:
    def fmt(value):
        return "n/a" if value is None else f"{value:.3f}"

    return "\n".join([
        f"# SwiftKV build of {report['base_model']}",
        "",
        f"Checkpoint: `{report['checkpoint']}` (num_key_value_layers={report['num_key_value_layers']}, "
        f"key_value_group_size={report['key_value_group_size']})",
        "",
        "| held-out teacher prompts | before distillation | after |",
        "|---|---|---|",
        f"| top-1 agreement with base | {fmt(report['eval_top1_agreement_before'])} | {fmt(report['eval_top1_agreement_after'])} |",
        f"| KL(base ‖ SwiftKV), nats/token | {fmt(report['eval_kl_before'])} | {fmt(report['eval_kl_after'])} |",
        "",
        f"Distillation: {report['steps']} steps, {report['tokens_seen']} tokens, {report['train_seconds'] / 60:.1f} min "
        f"({report['tokens_per_second']:.0f} tokens/s); whole build {report['wall_seconds'] / 60:.1f} min.",
        "",
        "![learning curve](learning_curve.png)",
        "",
    ])
