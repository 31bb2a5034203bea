"""`swiftkv` command line: a thin layer over the library functions."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from swiftkv.distill.config import DistillConfig
from swiftkv.eval import DEFAULT_TASKS, SAME_CHECKPOINT
from swiftkv.loading import DEFAULT_MODEL


def _convert(args: argparse.Namespace) -> None:
    from swiftkv.convert import convert_checkpoint

    out = convert_checkpoint(args.model, args.out, args.num_key_value_layers, args.key_value_group_size,
                             dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"wrote SwiftKV checkpoint to {out}")


def _add_distill_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `DistillConfig` field (same names), plus `--config FILE` holding any of them."""
    parser.add_argument("--config", help="YAML/JSON file with DistillConfig fields; flags override it")
    for field in dataclasses.fields(DistillConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None,
                            help=f"default: {field.default}")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--corpus-prompts", type=int, default=512,
                        help="built-in prompts the teacher answers for the default corpus")
    parser.add_argument("--corpus-max-new-tokens", type=int, default=128)


def _distill_config(args: argparse.Namespace) -> DistillConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)
                 if getattr(args, f.name) is not None}
    return DistillConfig.from_file(args.config, **overrides) if args.config else DistillConfig(**overrides)


def _distill(args: argparse.Namespace) -> None:
    from swiftkv.distill import distill

    final, state = distill(args.model, args.out, data=args.data, teacher=args.teacher, config=_distill_config(args),
                           resume=args.resume, corpus_prompts=args.corpus_prompts,
                           corpus_max_new_tokens=args.corpus_max_new_tokens)
    print(f"wrote distilled SwiftKV checkpoint to {final} after {state.step} steps")


def _build(args: argparse.Namespace) -> None:
    from swiftkv.build import run_build

    run_build(args.model, args.out, args.num_key_value_layers, args.key_value_group_size, _distill_config(args),
              resume=args.resume, corpus_prompts=args.corpus_prompts, corpus_max_new_tokens=args.corpus_max_new_tokens)


def _eval(args: argparse.Namespace) -> None:
    from swiftkv.eval import evaluate

    baseline = None if args.baseline == "none" else args.baseline
    evaluate(args.model, args.tasks, baseline, args.limit, args.batch_size, args.dtype, args.max_new_tokens, args.out)


def _add_layout_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-key-value-layers", default="0.5",
                        help="layers that keep their own KV: a count (16) or a fraction of all layers (0.5)")
    parser.add_argument("--key-value-group-size", type=int, default=1,
                        help="AcrossKV: SwiftKV layers sharing one KV cache entry (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swiftkv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert a base model into a SwiftKV checkpoint")
    convert.add_argument("--model", default=DEFAULT_MODEL,
                         help="built-in alias, local HF directory, .gguf file or hub id (default: %(default)s)")
    _add_layout_flags(convert)
    convert.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    convert.add_argument("--max-shard-size", default="2GB")
    convert.add_argument("--out", required=True, help="output directory")
    convert.set_defaults(run=_convert)

    distill = commands.add_parser("distill", help="distill a SwiftKV checkpoint from its base model")
    distill.add_argument("--model", required=True, help="SwiftKV checkpoint (from `swiftkv convert`)")
    distill.add_argument("--teacher", help="separate base model (default: the checkpoint with swiftkv off)")
    distill.add_argument("--data", nargs="+", default=["default"],
                         help="'default' (teacher-generated corpus), .jsonl/.json/.parquet/.txt files, "
                              "or hf:<dataset>[:split]")
    distill.add_argument("--out", required=True, help="run directory (checkpoints/, history.json, model/)")
    _add_distill_config_flags(distill)
    distill.set_defaults(run=_distill)

    evaluation = commands.add_parser("eval", help="quality of a model side by side with its baseline")
    evaluation.add_argument("--model", required=True, help="model to evaluate (SwiftKV checkpoint or any model)")
    evaluation.add_argument("--baseline", default=SAME_CHECKPOINT,
                            help=f"'{SAME_CHECKPOINT}' (same checkpoint, SwiftKV off; default), a model, or 'none'")
    evaluation.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS,
                            help="built-in task names or task files (.jsonl / .txt); default: %(default)s")
    evaluation.add_argument("--limit", type=int, help="examples (windows for perplexity) per task")
    evaluation.add_argument("--batch-size", type=int, default=16)
    evaluation.add_argument("--dtype", default="bfloat16", choices=["auto", "float32", "bfloat16", "float16"])
    evaluation.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens for fidelity tasks")
    evaluation.add_argument("--out", help="folder for eval.json and eval.md")
    evaluation.set_defaults(run=_eval)

    build = commands.add_parser("build", help="main job: convert + teacher corpus + distill + report")
    build.add_argument("--model", default=DEFAULT_MODEL, help="base model (default: %(default)s)")
    build.add_argument("--out", default="runs/smollm2-swiftkv", help="run directory (default: %(default)s)")
    _add_layout_flags(build)
    _add_distill_config_flags(build)
    build.set_defaults(run=_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"swiftkv {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
