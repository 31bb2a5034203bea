"""Learning curve plot and summary of a distillation run (from its `history.json`)."""

from __future__ import annotations

from pathlib import Path

from swiftkv.plotting import png_figure


def summarize(history: list[dict]) -> dict:
    """Held-out fidelity before/after, wall time and throughput of a run."""
    evals = [r for r in history if "eval_top1_agreement" in r]
    fitted = next((r for r in evals if r.get("stage") == "least_squares"), None)
    steps = [r for r in history if "loss" in r]
    train_seconds = steps[-1]["train_seconds"] if steps else 0.0
    tokens = steps[-1]["tokens_seen"] if steps else 0
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "tokens_seen": tokens,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens / train_seconds if train_seconds else 0.0,
        "eval_top1_agreement_before": evals[0]["eval_top1_agreement"] if evals else None,
        "eval_kl_before": evals[0]["eval_kl"] if evals else None,
        "eval_top1_agreement_least_squares": fitted["eval_top1_agreement"] if fitted else None,
        "eval_kl_least_squares": fitted["eval_kl"] if fitted else None,
        "eval_top1_agreement_after": evals[-1]["eval_top1_agreement"] if evals else None,
        "eval_kl_after": evals[-1]["eval_kl"] if evals else None,
    }


def loss_label(config) -> str:
    """What the train loss of a `DistillConfig` is, for the plot legend."""
    hidden = f" + {config.hidden_loss_weight:g} x hidden MSE" if config.hidden_loss_weight > 0 else ""
    return f"train loss (KL, T={config.logits_loss_temp:g}{hidden})"


def plot_learning_curve(history: list[dict], path: str | Path, title: str = "SwiftKV distillation",
                        train_loss_label: str = "train loss") -> Path:
    steps = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval_top1_agreement" in r]
    with png_figure(path, 1, 2, figsize=(11, 4)) as (fig, (loss_ax, agree_ax)):
        loss_ax.plot([r["tokens_seen"] / 1e3 for r in steps], [r["loss"] for r in steps], lw=0.8,
                     label=train_loss_label)
        loss_ax.plot([r["tokens_seen"] / 1e3 for r in evals], [r["eval_kl"] for r in evals], "o-",
                     label="held-out KL (T=1)")
        loss_ax.set_xlabel("tokens (k)")
        loss_ax.set_ylabel("KL(teacher || student), nats/token")
        loss_ax.set_yscale("log")
        loss_ax.legend()
        agree_ax.plot([r["tokens_seen"] / 1e3 for r in evals], [r["eval_top1_agreement"] for r in evals], "o-",
                      color="C2")
        agree_ax.set_xlabel("tokens (k)")
        agree_ax.set_ylabel("held-out top-1 agreement with teacher")
        agree_ax.set_ylim(0, 1)
        agree_ax.grid(alpha=0.3)
        fig.suptitle(title)
    return Path(path)
