"""Quality against prefill compute for several `num_key_value_layers` of one base model.

For each l, the base model is converted (untrained, paper initialization) and compared with itself
with SwiftKV off: multiple-choice accuracy, and fidelity (top-1 agreement, KL) on chat prompts.
Distilled checkpoints (`--distilled DIR ...`) are added as separate points. Prefill compute is the
per-token layer work a long prompt pays, l / L. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from swiftkv.convert import convert_to_swiftkv
from swiftkv.eval.runner import Candidate, evaluate_fidelity, evaluate_likelihood_task
from swiftkv.eval.tasks import resolve_task
from swiftkv.loading import DEFAULT_MODEL, load_model, load_tokenizer
from swiftkv.plotting import png_figure


def measure(model, tokenizer, args) -> dict:
    swiftkv, base = Candidate("swiftkv", model, True), Candidate("base", model, False)
    accuracy = evaluate_likelihood_task(swiftkv, tokenizer, resolve_task(args.accuracy_task), args.accuracy_limit,
                                        args.batch_size)
    fidelity = evaluate_fidelity(swiftkv, base, tokenizer, resolve_task(args.fidelity_task), args.fidelity_limit,
                                 args.batch_size, args.max_new_tokens)
    return {"accuracy": float(np.mean(accuracy.metrics["acc_norm"].values)),
            "top1_agreement": float(np.mean(fidelity.metrics["top1_agreement"].values)),
            "kl": float(np.mean(fidelity.metrics["kl"].values))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--layers", type=int, nargs="+", default=[30, 24, 20, 15, 10])
    parser.add_argument("--distilled", nargs="*", default=[], help="distilled SwiftKV checkpoints to add")
    parser.add_argument("--accuracy-task", default="arc_easy")
    parser.add_argument("--accuracy-limit", type=int, default=300)
    parser.add_argument("--fidelity-task", default="vicuna_bench")
    parser.add_argument("--fidelity-limit", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/quality_tradeoff")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    base = load_model(args.model, dtype="bfloat16")
    points = []
    for layers in args.layers:
        model = convert_to_swiftkv(base, layers)
        point = {"label": f"l={layers} (untrained)", "num_key_value_layers": layers, "distilled": False,
                 "prefill_compute": layers / model.config.num_hidden_layers, **measure(model, tokenizer, args)}
        print(json.dumps(point))
        points.append(point)
    for path in args.distilled:
        model = load_model(path, dtype="bfloat16")
        config = model.config
        point = {"label": f"l={config.num_key_value_layers} distilled", "checkpoint": path, "distilled": True,
                 "num_key_value_layers": config.num_key_value_layers,
                 "prefill_compute": config.num_key_value_layers / config.num_hidden_layers,
                 **measure(model, tokenizer, args)}
        print(json.dumps(point))
        points.append(point)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"model": args.model, "settings": vars(args), "points": points},
                                                   indent=2))
    plot(points, args, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def plot(points: list[dict], args, path: Path) -> None:
    with png_figure(path, 1, 2, figsize=(11, 4)) as (fig, axes):
        for ax, key, label in ((axes[0], "accuracy", f"{args.accuracy_task} acc_norm (n={args.accuracy_limit})"),
                               (axes[1], "top1_agreement", f"top-1 agreement with base, {args.fidelity_task}")):
            for distilled, marker, name in ((False, "o-", "untrained conversion"), (True, "*", "distilled")):
                chosen = sorted((p for p in points if p["distilled"] == distilled), key=lambda p: p["prefill_compute"])
                if chosen:
                    ax.plot([p["prefill_compute"] for p in chosen], [p[key] for p in chosen], marker, ms=10 if distilled else 6,
                            label=name)
            ax.set_xlabel("prefill compute per prompt token (l / L)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"{args.model}: quality vs prefill compute (SwiftKV num_key_value_layers)")


if __name__ == "__main__":
    main()
