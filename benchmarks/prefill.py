"""Prefill time and fidelity of a freshly converted SwiftKV model vs its base, measured in one run.

Prefill = one forward over the prompt that returns the next-token logits and fills the KV cache
(HF `transformers` path: `logits_to_keep=1`, `DynamicCache`). The base is the same checkpoint with
`swiftkv = False`, so weights, dtype and kernels are identical and only SwiftKV differs.

`--random-weights SHAPE` times a random-weight model of that shape instead (on a GPU, where only the repository
travels); `--model` then only supplies the tokenizer, and fidelity, which needs real weights, is skipped.
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

from shapes import SHAPES, random_model


@torch.no_grad()
def prefill_seconds(model, input_ids: torch.Tensor, repeats: int) -> list[float]:
    """Seconds until the next token is on the host (`.item()` waits for a GPU to finish)."""
    model(input_ids, logits_to_keep=1, use_cache=True).logits.argmax(-1).item()  # warm-up at this length
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids, logits_to_keep=1, use_cache=True).logits.argmax(-1).item()
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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-weights", choices=sorted(SHAPES), help="time a random-weight model of this shape")
    parser.add_argument("--out", default="benchmarks/results/prefill")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    text = data_file("wikitext2_test_raw.txt").read_text()
    dtype = getattr(torch, args.dtype)
    if args.random_weights:
        model = convert_to_swiftkv(random_model(args.random_weights, dtype, args.device),
                                   args.num_key_value_layers, args.key_value_group_size)
        fidelity = None
    else:
        model = convert_to_swiftkv(load_model(args.model, dtype="float32"), args.num_key_value_layers,
                                   args.key_value_group_size)
        fidelity = measure_fidelity(model, text_chunks(tokenizer, text, 128, args.fidelity_chunks)).summary()
        model = model.to(args.device, dtype)
    all_ids = tokenizer(text[:1_000_000], return_tensors="pt").input_ids.to(args.device)
    if all_ids.shape[1] < max(args.lengths):
        raise SystemExit(f"wikitext gives {all_ids.shape[1]} tokens, fewer than --lengths {max(args.lengths)}")
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
        "model": f"random-weight {args.random_weights}" if args.random_weights else args.model,
        "dtype": args.dtype, "device": device_name(args.device), "threads": torch.get_num_threads(),
        "num_hidden_layers": config.num_hidden_layers, "num_key_value_layers": config.num_key_value_layers,
        "key_value_group_size": config.key_value_group_size,
        "layer_work_fraction": config.num_key_value_layers / config.num_hidden_layers,
        "untrained_fidelity_wikitext2": fidelity, "prefill": rows,
    }
    if fidelity is not None:
        print(json.dumps(fidelity))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(rows, result, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


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
        ax.set_title(f"{result['model']} prefill, {result['dtype']}, {result['device']}")
        ax.legend()


if __name__ == "__main__":
    main()
