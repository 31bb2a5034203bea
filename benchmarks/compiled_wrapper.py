"""Compiled decode steps called from a C++ wrapper against inductor's Python wrapper, side by side.

`--compile-decode` runs a decode step as one inductor graph; what calls the graph's kernels (the weight
products, our attention and cache-write ops, inductor's fused C++ kernels: ~10 per layer) is generated code,
Python by default, C++ with `cpp_wrapper` (`swiftkv/engine/compiled.py: CPP_WRAPPER`). Each wrapper is timed
in its own process (a process holds one compiled `_forward` per structure), the two alternating for `--rounds`
rounds so that the machine's drift hits both: one-stream decode (a 256-token prompt, medians of 7 x 64
steps) and `--streams` streams (output tokens/s), for the base model and SwiftKV-50%, in bf16 and with int4
weights. Writes JSON and a PNG.

    .venv/bin/python benchmarks/compiled_wrapper.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SYSTEMS = {"base-bf16": ("base", "auto"), "swiftkv-bf16": ("swiftkv", "auto"), "base-int4": ("base", "int4"),
           "swiftkv-int4": ("swiftkv", "int4")}
WRAPPERS = ("python", "cpp")


def measure(system: str, wrapper: str, streams: int) -> dict:
    """One process's figures: compile seconds, one-stream ms per token, `streams`-stream tokens/s."""
    import torch

    from swiftkv.convert import convert_to_swiftkv
    from swiftkv.engine import EngineConfig, LLMEngine, compiled
    from swiftkv.eval.data import data_file
    from swiftkv.loading import DEFAULT_MODEL, load_model, load_tokenizer

    from decode_profile import decode_steps
    from engine import engine_decode_ms

    compiled.CPP_WRAPPER = wrapper == "cpp"
    kind, weights = SYSTEMS[system]
    model = load_model(DEFAULT_MODEL, dtype=torch.bfloat16)
    if kind == "swiftkv":
        model = convert_to_swiftkv(model, model.config.num_hidden_layers // 2, 1)
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    # every stream's prompt in one step, so that the streams' tokens/s time decode steps only
    engine = LLMEngine(model, tokenizer, EngineConfig(compile_decode=True, weights=weights,
                                                      max_prefill_tokens=128 * streams))
    text_ids = tokenizer(data_file("wikitext2_test_raw.txt").read_text()[:200_000], add_special_tokens=False).input_ids
    decode_steps(engine, text_ids[:256], 16)  # warm-up
    one = [decode_steps(engine, text_ids[:256], 64)[1] * 1000 for _ in range(7)]
    many = [engine_decode_ms(engine, [text_ids[i * 500:i * 500 + 128] for i in range(streams)], 32)
            ["output_tokens_per_second"] for _ in range(3)]
    return {"compile_seconds": engine.runner.compile_seconds, "decode_1_ms": statistics.median(one),
            f"decode_{streams}_tokens_per_s": statistics.median(many)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--out", default="benchmarks/results/compiled_wrapper")
    parser.add_argument("--worker", nargs=2, metavar=("SYSTEM", "WRAPPER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(measure(*args.worker, args.streams)), flush=True)
        return

    import torch

    from swiftkv.plotting import png_figure

    runs = {system: {wrapper: [] for wrapper in WRAPPERS} for system in args.systems}
    for round_ in range(args.rounds):
        for system in args.systems:
            for wrapper in WRAPPERS:
                output = subprocess.run([sys.executable, __file__, "--worker", system, wrapper, "--streams",
                                         str(args.streams)], capture_output=True, text=True, check=True).stdout
                result = json.loads(output.split("RESULT ", 1)[1])
                runs[system][wrapper].append(result)
                print(f"round {round_ + 1}: {system}, {wrapper} wrapper: {result}", flush=True)
    keys = ("decode_1_ms", f"decode_{args.streams}_tokens_per_s", "compile_seconds")
    summary = {system: {wrapper: {key: statistics.median(run[key] for run in runs[system][wrapper]) for key in keys}
                        for wrapper in WRAPPERS} for system in args.systems}
    for system, row in summary.items():
        row["decode_1_speedup"] = row["python"]["decode_1_ms"] / row["cpp"]["decode_1_ms"]
        row[f"decode_{args.streams}_speedup"] = row["cpp"][keys[1]] / row["python"][keys[1]]
    results = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "settings": vars(args),
               "summary": summary, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    with png_figure(out.with_suffix(".png"), 1, 2, figsize=(11, 4)) as (_, axes):
        for axis, key, label in zip(axes, keys, ("ms per token, 1 stream", f"tokens/s, {args.streams} streams")):
            for offset, wrapper in enumerate(WRAPPERS):
                axis.bar([i + 0.4 * offset for i in range(len(summary))],
                         [summary[system][wrapper][key] for system in summary], width=0.4,
                         label=f"{wrapper} wrapper")
            axis.set_xticks([i + 0.2 for i in range(len(summary))], list(summary))
            axis.set_ylabel(label)
            axis.legend()
    print(json.dumps(summary, indent=1))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
