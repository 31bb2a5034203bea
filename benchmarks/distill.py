"""Distill SwiftKV-50% SmolLM2-135M with the default recipe (`swiftkv build`) and record the result.

Writes benchmarks/results/distill.json (held-out top-1 agreement and KL before/after, wall time,
tokens/s, the recipe) and distill.png (learning curve). The "before" numbers are the untrained
conversion measured on the same held-out teacher prompts in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from swiftkv.build import run_build
from swiftkv.distill import DistillConfig
from swiftkv.loading import DEFAULT_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--num-key-value-layers", default="0.5")
    parser.add_argument("--key-value-group-size", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=DistillConfig.max_steps)
    parser.add_argument("--learning-rate", type=float, default=DistillConfig.learning_rate)
    parser.add_argument("--corpus-prompts", type=int, default=DistillConfig.corpus_prompts)
    parser.add_argument("--corpus-max-new-tokens", type=int, default=DistillConfig.corpus_max_new_tokens)
    parser.add_argument("--corpus-samples", type=int, default=DistillConfig.corpus_samples)
    parser.add_argument("--run-dir", default="runs/bench-distill")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/distill")
    args = parser.parse_args()

    config = DistillConfig(max_steps=args.max_steps, learning_rate=args.learning_rate,
                           corpus_prompts=args.corpus_prompts, corpus_max_new_tokens=args.corpus_max_new_tokens,
                           corpus_samples=args.corpus_samples)
    report = run_build(args.model, args.run_dir, args.num_key_value_layers, args.key_value_group_size, config,
                       resume=args.resume)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**report, "recipe": config.to_dict()}, indent=2))
    shutil.copy(Path(args.run_dir) / "learning_curve.png", out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
