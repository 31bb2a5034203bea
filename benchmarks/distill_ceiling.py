"""How far can distillation take SwiftKV at this `l`? Train on the held-out blocks themselves.

`benchmarks/distill.py` reports agreement on held-out teacher prompts, which mixes two limits: how well
the recipe generalizes from the training corpus, and what the SwiftKV layers can express at all (their
K/V are linear maps of one hidden state). Here the student trains on exactly the blocks it is scored on,
so the generalization gap is gone and the curve's plateau is the recipe's ceiling for this checkpoint.
Agreement is also split into prompt tokens (template + user) and response tokens (the teacher's answer).

Input: the converted (untrained) SwiftKV checkpoint of a `benchmarks/distill.py` run, whose teacher
corpus is cached (default `runs/bench-distill/converted`). Writes JSON and a PNG learning curve.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from swiftkv.distill import DEFAULT_DATA, DistillConfig, distillation_blocks
from swiftkv.distill.data import encode_record, record_messages, split_records
from swiftkv.distill.trainer import DistillTrainer
from swiftkv.eval.fidelity import token_kl_and_agreement
from swiftkv.loading import load_model, load_tokenizer
from swiftkv.models.swiftkv import swiftkv_mode
from swiftkv.plotting import png_figure


@torch.inference_mode()
def agreement_by_role(model, tokenizer, records: list[dict]) -> dict:
    """Top-1 agreement (student vs teacher = same weights, swiftkv off) on prompt and response tokens."""
    counts = {"prompt": [0.0, 0], "response": [0.0, 0]}
    for record in records:
        token_ids = encode_record(record, tokenizer)
        prompt_length = len(tokenizer.apply_chat_template(record_messages(record)[:-1], tokenize=True,
                                                          add_generation_prompt=True))
        input_ids = torch.tensor([token_ids])
        with swiftkv_mode(model, False):
            teacher = model(input_ids).logits[0, :-1]
        with swiftkv_mode(model, True):
            student = model(input_ids).logits[0, :-1]
        _, agree = token_kl_and_agreement(teacher, student)  # position i predicts token i + 1
        for role, part in (("prompt", agree[:prompt_length - 1]), ("response", agree[prompt_length - 1:])):
            counts[role][0] += part.sum().item()
            counts[role][1] += part.numel()
    return {role: hits / max(total, 1) for role, (hits, total) in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/bench-distill/converted")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--learning-rate", type=float, default=DistillConfig.learning_rate)
    parser.add_argument("--least-squares-blocks", type=int, default=0,
                        help="0 (as in the committed result): start from the paper's copies")
    parser.add_argument("--corpus-prompts", type=int, default=DistillConfig.corpus_prompts)
    parser.add_argument("--corpus-max-new-tokens", type=int, default=DistillConfig.corpus_max_new_tokens)
    parser.add_argument("--out", default="benchmarks/results/distill_ceiling")
    args = parser.parse_args()

    config = DistillConfig(max_steps=args.max_steps, learning_rate=args.learning_rate, eval_every=10,
                           save_every=args.max_steps, keep_checkpoints=1,
                           least_squares_blocks=args.least_squares_blocks, corpus_prompts=args.corpus_prompts,
                           corpus_max_new_tokens=args.corpus_max_new_tokens)
    tokenizer = load_tokenizer(args.model)
    records, _, held_out = distillation_blocks([DEFAULT_DATA], args.model, tokenizer, config)
    _, held_out_records = split_records(records, config.eval_fraction, config.seed)

    student = load_model(args.model, dtype="float32")
    student.config.swiftkv = True
    before = agreement_by_role(student, tokenizer, held_out_records)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = DistillTrainer(student, held_out, held_out, config, run_dir)
        state = trainer.train()
        student = trainer.student
    after = agreement_by_role(student, tokenizer, held_out_records)
    curve = [row for row in state.history if "eval_top1_agreement" in row]
    result = {
        "model": args.model, "num_key_value_layers": student.config.num_key_value_layers,
        "num_hidden_layers": student.config.num_hidden_layers, "held_out_blocks": len(held_out),
        "held_out_records": len(held_out_records), "steps": state.step, "train_seconds": state.train_seconds,
        "agreement_before": curve[0]["eval_top1_agreement"], "agreement_after": curve[-1]["eval_top1_agreement"],
        "kl_before": curve[0]["eval_kl"], "kl_after": curve[-1]["eval_kl"],
        "agreement_by_role_before": before, "agreement_by_role_after": after,
        "curve": [{k: row[k] for k in ("step", "eval_kl", "eval_top1_agreement")} for row in curve],
        "recipe": config.to_dict(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("curve", "recipe")}, indent=1))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def plot(result: dict, path: Path) -> None:
    steps = [row["step"] for row in result["curve"]]
    with png_figure(path, figsize=(6, 4), dpi=120) as (fig, ax):
        ax.plot(steps, [row["eval_top1_agreement"] for row in result["curve"]], marker="o",
                label="top-1 agreement (trained on these blocks)")
        ax.axhline(0.85, color="tab:red", linestyle="--", label="issue target 0.85")
        ax.set_xlabel("step")
        ax.set_ylabel("agreement with the teacher")
        ax.set_title(f"SwiftKV l={result['num_key_value_layers']}/{result['num_hidden_layers']}: recipe ceiling")
        ax.legend()


if __name__ == "__main__":
    main()
