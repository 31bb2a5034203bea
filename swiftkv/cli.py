"""`swiftkv` command line: a thin layer over the library functions."""

from __future__ import annotations

import argparse
import sys

from swiftkv.loading import DEFAULT_MODEL


def _convert(args: argparse.Namespace) -> None:
    from swiftkv.convert import convert_checkpoint

    out = convert_checkpoint(args.model, args.out, args.num_key_value_layers, args.key_value_group_size,
                             dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"wrote SwiftKV checkpoint to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swiftkv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert a base model into a SwiftKV checkpoint")
    convert.add_argument("--model", default=DEFAULT_MODEL,
                         help="built-in alias, local HF directory, .gguf file or hub id (default: %(default)s)")
    convert.add_argument("--num-key-value-layers", default="0.5",
                         help="layers that keep their own KV: a count (16) or a fraction of all layers (0.5)")
    convert.add_argument("--key-value-group-size", type=int, default=1,
                         help="AcrossKV: SwiftKV layers sharing one KV cache entry (default: %(default)s)")
    convert.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    convert.add_argument("--max-shard-size", default="2GB")
    convert.add_argument("--out", required=True, help="output directory")
    convert.set_defaults(run=_convert)
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
