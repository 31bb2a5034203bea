"""Collect and plot the held-out curves of `benchmarks/distill_variants.sh`.

  python benchmarks/distill_variants_report.py add RESULTS_JSON NAME FLAGS HISTORY_JSON
  python benchmarks/distill_variants_report.py plot RESULTS_JSON      (writes RESULTS_JSON with .png)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from swiftkv.plotting import png_figure


def add_variant(results: Path, name: str, flags: str, history: Path) -> dict:
    rows = json.loads(results.read_text()) if results.exists() else []
    records = json.loads(history.read_text())
    curve = [{k: r[k] for k in ("step", "eval_top1_agreement", "eval_kl")} for r in records
             if "eval_top1_agreement" in r]
    last_step = [r for r in records if "tokens_per_second" in r][-1]
    row = {"variant": name, "flags": flags, "final_agreement": curve[-1]["eval_top1_agreement"],
           "final_kl": curve[-1]["eval_kl"], "tokens_seen": last_step["tokens_seen"],
           "train_seconds": last_step["train_seconds"], "curve": curve}
    results.write_text(json.dumps(rows + [row], indent=1))
    return row


def plot(results: Path) -> Path:
    path = results.with_suffix(".png")
    with png_figure(path, figsize=(7, 4.5), dpi=120) as (fig, ax):
        for row in json.loads(results.read_text()):
            trained = [point for point in row["curve"] if point["step"] > 0]
            tokens_per_step = row["tokens_seen"] / trained[-1]["step"]
            ax.plot([point["step"] * tokens_per_step / 1e6 for point in trained],
                    [point["eval_top1_agreement"] for point in trained],
                    label=f"{row['variant']}: {row['final_agreement']:.3f}")
        ax.axhline(0.85, color="tab:red", linestyle="--", label="issue target 0.85")
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("held-out top-1 agreement with the teacher")
        ax.set_title("SwiftKV-50% SmolLM2-135M: recipe variants")
        ax.legend(fontsize=8)
    return path


if __name__ == "__main__":
    command, results, *rest = sys.argv[1:]
    if command == "add":
        row = add_variant(Path(results), *rest[:2], Path(rest[2]))
        print(f"{row['variant']}: agreement {row['final_agreement']:.4f}, KL {row['final_kl']:.4f}")
    else:
        print(f"wrote {plot(Path(results))}")
