"""`swiftkv build`: the main job. Convert a base model, generate the default data with the teacher,
distill, evaluate, and write a short report — on the embedded SmolLM2 by default."""

from __future__ import annotations

import json
import time
from pathlib import Path

from swiftkv.checkpoint import CheckpointError, output_folder, validate_checkpoint
from swiftkv.convert import convert_checkpoint
from swiftkv.distill import DistillConfig, distill, process_state
from swiftkv.distill.report import loss_label, plot_learning_curve, summarize
from swiftkv.eval.tasks import resolve_task


EVAL_TASKS = ["vicuna_bench", "arc_easy"]  # real user prompts (fidelity) + a quick accuracy check


def run_build(model: str, out_dir: str | Path, num_key_value_layers: str | float = 0.5,
              key_value_group_size: int = 1, config: DistillConfig | None = None, resume: bool = False,
              eval_limit: int | None = 80) -> dict:
    """Run every stage (a stage whose output is already complete is reused); return the report dict.

    `eval_limit=0` skips the side-by-side evaluation of the distilled model against its base. Under
    `accelerate launch` every process distills (data parallel); the main process converts first (the others
    then reuse its checkpoint) and alone evaluates and writes the report.
    """
    state = process_state()
    out_dir, config = output_folder(out_dir), config or DistillConfig()
    started = time.perf_counter()
    if eval_limit != 0:
        try:  # find the evaluation data now, not after an hour of distillation
            [resolve_task(task) for task in EVAL_TASKS]
        except FileNotFoundError as error:
            print(f"the final evaluation will be skipped: {error}")
            eval_limit = 0
    converted = out_dir / "converted"
    with state.main_process_first():
        try:
            validate_checkpoint(converted)
            print(f"[1/4] reusing converted checkpoint {converted}")
        except CheckpointError:
            print(f"[1/4] converting {model} (num_key_value_layers={num_key_value_layers}, "
                  f"key_value_group_size={key_value_group_size})")
            convert_checkpoint(model, converted, num_key_value_layers, key_value_group_size)
    print("[2/4] teacher corpus + distillation")
    final, trainer_state = distill(str(converted), out_dir, config=config, resume=resume)
    report = {"base_model": model, "checkpoint": str(final), "num_key_value_layers": num_key_value_layers,
              "key_value_group_size": key_value_group_size, **summarize(trainer_state.history)}
    if state.is_main_process:
        report = _evaluate_and_report(model, out_dir, final, trainer_state, config, eval_limit, report, started)
    state.wait_for_everyone()
    return report


def _evaluate_and_report(model: str, out_dir: Path, final: Path, trainer_state, config: DistillConfig,
                         eval_limit: int | None, report: dict, started: float) -> dict:
    evaluation = ""
    if eval_limit != 0:
        print(f"[3/4] side-by-side evaluation ({', '.join(EVAL_TASKS)}, limit {eval_limit})")
        from swiftkv.eval import baseline_for, evaluate

        evaluate(str(final), EVAL_TASKS, baseline_for(model, config.trainable), limit=eval_limit,
                 out_dir=out_dir / "eval")
        evaluation = (out_dir / "eval" / "eval.md").read_text()
    print("[4/4] report")
    report["wall_seconds"] = time.perf_counter() - started
    plot_learning_curve(trainer_state.history, out_dir / "learning_curve.png", title=f"SwiftKV distillation of {model}",
                        train_loss_label=loss_label(config))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(render_report(report) + evaluation.replace("# ", "## Evaluation: ", 1))
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
        "| held-out teacher prompts | converted | least-squares K/V start | distilled |",
        "|---|---|---|---|",
        f"| top-1 agreement with base | {fmt(report['eval_top1_agreement_before'])} | "
        f"{fmt(report.get('eval_top1_agreement_least_squares'))} | {fmt(report['eval_top1_agreement_after'])} |",
        f"| KL(base ‖ SwiftKV), nats/token | {fmt(report['eval_kl_before'])} | "
        f"{fmt(report.get('eval_kl_least_squares'))} | {fmt(report['eval_kl_after'])} |",
        "",
        f"Distillation: {report['steps']} steps, {report['tokens_seen']} tokens, {report['train_seconds'] / 60:.1f} min "
        f"({report['tokens_per_second']:.0f} tokens/s); whole build {report['wall_seconds'] / 60:.1f} min.",
        "",
        "![learning curve](learning_curve.png)",
        "",
    ])
