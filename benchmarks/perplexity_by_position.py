"""Where in a long context a SwiftKV checkpoint loses raw-text prediction: WikiText-2 perplexity by token
position, SwiftKV on and off (the base model inside a knowledge-preserving checkpoint, or `--baseline`), over
`--windows` consecutive windows of `--window` tokens, every position scored with all the window's earlier tokens
as context. A loss that grows with position is a loss in what the prompt tokens' keys and values carry.
Writes JSON and a PNG.

  python benchmarks/perplexity_by_position.py --models runs/smollm2-search/points/l15-g1/model
  # checkpoints whose layers were distilled too (`--trainable all_layers`) no longer hold the base model:
  python benchmarks/perplexity_by_position.py --models runs/all-l15/model --baseline smollm2-135m-instruct \
      --out benchmarks/results/perplexity_by_position_all_layers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from swiftkv.eval.data import data_file, text_chunks
from swiftkv.loading import load_model, load_tokenizer
from swiftkv.models.swiftkv import swiftkv_mode
from swiftkv.plotting import png_figure


def position_nll(model, windows: list[torch.Tensor], swiftkv: bool) -> torch.Tensor:
    """Summed NLL per predicted position `[window - 1]` over `windows` (a base model runs as it is)."""
    total = None
    mode = swiftkv_mode(model, swiftkv) if hasattr(model.config, "swiftkv") else contextlib.nullcontext()
    with torch.inference_mode(), mode:
        for window in tqdm(windows, desc=f"swiftkv {'on' if swiftkv else 'off'}", leave=False):
            logits = model(window[None], use_cache=False).logits[0, :-1].float()
            nll = F.cross_entropy(logits, window[1:], reduction="none")
            total = nll if total is None else total + nll
    return total


def by_bucket(on: torch.Tensor, off: torch.Tensor, edges: list[int], count: int) -> list[dict]:
    rows = []
    for start, end in zip(edges, edges[1:]):
        tokens = count * (end - start)
        base, swift = (off[start:end].sum() / tokens).exp().item(), (on[start:end].sum() / tokens).exp().item()
        rows.append({"positions": [start, end], "base_ppl": base, "swiftkv_ppl": swift, "ratio": swift / base})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="SwiftKV checkpoints")
    parser.add_argument("--baseline", help="the base model, for checkpoints that no longer hold it (default: "
                                           "each checkpoint with SwiftKV off)")
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--out", default="benchmarks/results/perplexity_by_position")
    args = parser.parse_args()
    edges = [0, 64, 128, 256, 512, 768, args.window - 1]
    results = {"date": time.strftime("%Y-%m-%d"), "settings": vars(args), "models": {}}
    text = data_file("wikitext2_test_raw.txt").read_text()
    for path in args.models:
        windows = text_chunks(load_tokenizer(path), text, args.window, args.windows)
        model = load_model(path, dtype="bfloat16")
        on = position_nll(model, windows, True)
        if args.baseline:
            model = load_model(args.baseline, dtype="bfloat16")
        off = position_nll(model, windows, False)
        results["models"][path] = by_bucket(on, off, edges, args.windows)
        for row in results["models"][path]:
            print(path, row["positions"], {k: round(row[k], 2) for k in ("base_ppl", "swiftkv_ppl", "ratio")})
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    with png_figure(out.with_suffix(".png"), 1, 1, figsize=(7, 4.5)) as (_, axes):
        for path, rows in results["models"].items():
            axes.plot([sum(r["positions"]) / 2 for r in rows], [r["ratio"] for r in rows], marker="o", label=path)
        axes.set_xlabel(f"token position in a {args.window}-token WikiText-2 window")
        axes.set_ylabel("perplexity, SwiftKV on / off")
        axes.set_title("raw-text loss by position")
        axes.legend(fontsize=7)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
