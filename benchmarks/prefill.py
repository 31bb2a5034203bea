"""Prefill time and fidelity of a freshly converted SwiftKV model vs its base, measured in one run.

Prefill = one forward over the prompt that returns the next-token logits and fills the KV cache
(HF `transformers` path: `logits_to_keep=1`, `DynamicCache`). The base is the same checkpoint with
`swiftkv = False`, so weights, dtype and kernels are identical and only SwiftKV differs.

Writes JSON (times, ratios, fidelity) and a PNG bar plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from swiftkv.convert import convert_to_swiftkv
from swiftkv.eval.data import data_file, text_chunks
from swiftkv.eval.fidelity import measure_fidelity
from swiftkv.loading import DEFAULT_MODEL, load_model, load_tokenizer
from swiftkv.models.swiftkv import swiftkv_mode
from swiftkv.plotting import png_figure


@torch.no_grad()
def prefill_seconds(model, input_ids: torch.Tensor, repeats: int) -> list[float]:
    model(input_ids[:, :64], logits_to_keep=1, use_cache=True)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids, logits_to_keep=1, use_cache=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--num-key-value-layers", default="0.5")
    parser.add_argument("--key-value-group-size", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fidelity-chunks", type=int, default=4, help="wikitext windows of 128 tokens")
    parser.add_argument("--out", default="benchmarks/results/prefill")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    model = convert_to_swiftkv(load_model(args.model, dtype="float32"), args.num_key_value_layers,
                               args.key_value_group_size)
    text = data_file("wikitext2_test_raw.txt").read_text()
    fidelity = measure_fidelity(model, text_chunks(tokenizer, text, 128, args.fidelity_chunks))

    model = model.to(getattr(torch, args.dtype))
    all_ids = tokenizer(text[:200_000], return_tensors="pt").input_ids
    rows = []
    for length in args.lengths:
        input_ids = all_ids[:, :length]
        with swiftkv_mode(model, enabled=False):
            base = prefill_seconds(model, input_ids, args.repeats)
        swift = prefill_seconds(model, input_ids, args.repeats)
        rows.append({"prompt_tokens": length, "base_s_median": statistics.median(base),
                     "swiftkv_s_median": statistics.median(swift), "base_s": base, "swiftkv_s": swift,
                     "speedup": statistics.median(base) / statistics.median(swift)})
        print(f"{length:5d} tokens: base {rows[-1]['base_s_median']:.3f}s  swiftkv {rows[-1]['swiftkv_s_median']:.3f}s"
              f"  speedup {rows[-1]['speedup']:.2f}x")
    config = model.config
    result = {
        "model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "num_hidden_layers": config.num_hidden_layers, "num_key_value_layers": config.num_key_value_layers,
        "key_value_group_size": config.key_value_group_size,
        "layer_work_fraction": config.num_key_value_layers / config.num_hidden_layers,
        "untrained_fidelity_wikitext2": fidelity.summary(), "prefill": rows,
    }
    print(json.dumps(result["untrained_fidelity_wikitext2"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(rows, result, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def plot(rows: list[dict], result: dict, path: Path) -> None:
    labels = [str(r["prompt_tokens"]) for r in rows]
    x = range(len(rows))
    with png_figure(path, figsize=(6, 4), dpi=120) as (fig, ax):
        ax.bar([i - 0.2 for i in x], [r["base_s_median"] for r in rows], 0.4, label="base (swiftkv off)")
        ax.bar([i + 0.2 for i in x], [r["swiftkv_s_median"] for r in rows], 0.4,
               label=f"SwiftKV l={result['num_key_value_layers']}/{result['num_hidden_layers']}")
        for i, r in enumerate(rows):
            ax.text(i + 0.2, r["swiftkv_s_median"], f"{r['speedup']:.2f}x", ha="center", va="bottom")
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("prefill seconds (median)")
        ax.set_title(f"{result['model']} prefill, {result['dtype']}, {result['threads']} threads")
        ax.legend()


if __name__ == "__main__":
    main()
