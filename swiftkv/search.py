"""`swiftkv search`: choose the SwiftKV depth by measured quality — a quality/speed frontier over depths
`l` (and AcrossKV group sizes), and the fastest point within a quality budget.

Each point is a `swiftkv build` without its short evaluation (convert, distill) in `OUT/points/l{l}-g{g}/`,
then the public tasks side by side with the base (the same checkpoint with SwiftKV off, paired CIs) in its
`quality/`. Every point shares the teacher corpus (one cache). A finished stage is never redone: a killed
search run again with the same arguments continues where it stopped (a distillation from its last
checkpoint). Then one speed pass times the base engine and every point in the same run, in alternating rounds
(TTFT on a long prompt, serving throughput), so speed is reported as ratios measured side by side. It writes
`frontier.json`, `frontier.md` and `frontier.png`, and `OUT/model` points at the chosen checkpoint.

The budget counts accuracy points (x100) lost on each accuracy task (multiple choice: acc_norm; LAMBADA: acc);
perplexity, agreement and KL are reported beside it. Under `accelerate launch` every process distills each
point (data parallel) and the main process alone evaluates, times and writes the frontier.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from swiftkv.build import run_build
from swiftkv.checkpoint import output_folder
from swiftkv.distill import DistillConfig, process_state
from swiftkv.eval import DEFAULT_TASKS

BUDGET_METRICS = ("acc_norm", "acc")  # per task, the first one it reports counts against the budget


@dataclass
class SearchConfig:
    depths: list[int]                    # num_key_value_layers of each point, run in this order
    group_sizes: list[int] = field(default_factory=lambda: [1])
    max_quality_drop: float = 1.0        # accuracy points any task may lose
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    eval_limit: Optional[int] = 500      # examples per task (None: all)
    ttft_tokens: int = 2048              # speed pass: prompt length for TTFT
    serving_requests: int = 8            # ... and serving: requests of ttft_tokens in / serving_output_tokens out
    serving_output_tokens: int = 64
    serving_rate: float = 1.0            # Poisson arrivals per second
    kv_cache_memory_gb: float = 0.25
    speed_rounds: int = 3                # the speed pass times every system once per round, rounds alternating


@dataclass(frozen=True)
class Point:
    depth: int
    group_size: int

    @property
    def name(self) -> str:
        return f"l{self.depth}-g{self.group_size}"


def default_depths(num_layers: int) -> list[int]:
    """1/3, 1/2, 2/3, 4/5 and 14/15 of the layers keep their own KV (30 layers: 10, 15, 20, 24, 28). The last,
    shallow point is what a tight budget can afford on a small model (SmolLM2-135M loses 2 points at l = 24)."""
    shares = (1 / 3, 1 / 2, 2 / 3, 4 / 5, 14 / 15)
    return sorted({max(1, min(num_layers - 1, round(num_layers * share))) for share in shares})


def search_points(config: SearchConfig, num_layers: int) -> list[Point]:
    """Every depth x group size that makes a valid layout (1 <= l < L, groups dividing L - l)."""
    points = [Point(depth, group) for depth in config.depths for group in config.group_sizes
              if 1 <= depth < num_layers and (num_layers - depth) % group == 0]
    if not points:
        raise ValueError(f"no valid point among depths {config.depths} x group sizes {config.group_sizes} for a "
                         f"model of {num_layers} layers (need 1 <= l < {num_layers}, groups dividing L - l)")
    return points


def quality_drops(eval_rows: list[dict], with_ci: bool = False) -> dict:
    """Accuracy points lost per task (negative: gained), from `swiftkv eval`'s rows; with `with_ci`, each as
    (drop, low, high) with the 95% CI of the paired difference."""
    drops = {}
    for metric in reversed(BUDGET_METRICS):  # acc_norm, where a task has it, overwrites acc
        for row in eval_rows:
            if row["metric"] == metric and row["difference"] is not None:
                difference = row["difference"]
                drop = -100 * difference["value"]
                if with_ci:
                    low, high = sorted(-100 * bound for bound in difference["ci95"])
                    drop = (drop, low, high)
                drops[row["task"]] = drop
    return drops


def pick(frontier: list[dict], max_quality_drop: float) -> Optional[dict]:
    """The fastest point among those whose every task lost at most `max_quality_drop` points, None when no point
    is within budget. Fastest: the most prefill skipped, then the larger measured TTFT speedup (AcrossKV group
    sizes at one depth), then the smaller worst drop. The share skipped comes first because TTFT follows it while
    single timings on a busy machine do not order close points (SmolLM2's l = 24 and l = 28 swapped places
    between two speed passes minutes apart: benchmarks/README.md)."""
    within = [row for row in frontier if row["worst_drop_points"] <= max_quality_drop]
    return max(within, key=lambda row: (row["prefill_compute_saved"], row["ttft_speedup"], -row["worst_drop_points"]),
               default=None)


def run_search(model: str, out_dir: str | Path, config: SearchConfig,
               distill_config: Optional[DistillConfig] = None) -> dict:
    """Every point's stages (each reused when complete), the speed pass, the frontier and the pick."""
    from swiftkv.eval import baseline_for, evaluate
    from swiftkv.eval.tasks import resolve_task
    from swiftkv.loading import load_config

    [resolve_task(task) for task in config.tasks]  # missing evaluation data fails now, not after a distillation
    state = process_state()
    out_dir = output_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_layers = load_config(model).num_hidden_layers
    points = search_points(config, num_layers)
    baseline = baseline_for(model, (distill_config or DistillConfig()).trainable)
    if state.is_main_process:
        (out_dir / "search_config.json").write_text(json.dumps({"model": model, **asdict(config)}, indent=2))
    for point in tqdm(points, desc="search points", unit="point", disable=not state.is_main_process):
        point_dir = out_dir / "points" / point.name
        if not (point_dir / "report.json").is_file():
            print(f"== {point.name}: convert + distill")
            run_build(model, point_dir, point.depth, point.group_size, distill_config, resume=True, eval_limit=0)
        if state.is_main_process and not (point_dir / "quality" / "eval.json").is_file():
            print(f"== {point.name}: quality ({', '.join(config.tasks)})")
            evaluate(str(point_dir / "model"), config.tasks, baseline, limit=config.eval_limit,
                     out_dir=point_dir / "quality")
        state.wait_for_everyone()  # every process sees the same finished stages at the next point
    if not state.is_main_process:
        state.wait_for_everyone()
        return json.loads((out_dir / "frontier.json").read_text())
    result = _frontier(model, out_dir, points, config, num_layers)
    state.wait_for_everyone()
    return result


def _frontier(model: str, out_dir: Path, points: list[Point], config: SearchConfig, num_layers: int) -> dict:
    """The speed pass, then the frontier files and the chosen checkpoint's link."""
    speed = measure_speed(model, out_dir, points, config)
    frontier = [frontier_row(point, out_dir / "points" / point.name, speed, num_layers)
                for point in sorted(points, key=lambda p: (p.depth, p.group_size))]
    chosen = pick(frontier, config.max_quality_drop)
    result = {"model": model, "date": time.strftime("%Y-%m-%d"), "settings": asdict(config),
              "base_speed": speed["base"], "points": frontier, "chosen": chosen and chosen["point"]}
    (out_dir / "frontier.json").write_text(json.dumps(result, indent=2))
    (out_dir / "frontier.md").write_text(render_frontier(result))
    plot_frontier(result, out_dir / "frontier.png")
    print(render_frontier(result))
    link = out_dir / "model"
    if link.is_symlink() or link.exists():
        link.unlink()
    if chosen:
        link.symlink_to(Path("points") / chosen["point"] / "model", target_is_directory=True)
    return result


def measure_speed(model: str, out_dir: Path, points: list[Point], config: SearchConfig) -> dict:
    """TTFT and serving throughput of the base engine and of each point, in one run (cached in speed.json
    for this set of points and settings): every system once per round, over `speed_rounds` rounds, medians.
    Alternating keeps a drift of the machine's speed (tens of percent over minutes on a busy host) from
    landing on one system; one system after another, two passes ordered close points differently."""
    from swiftkv.engine import EngineConfig, LLMEngine
    from swiftkv.engine.measure import engine_ttft, poisson_arrivals, serve_engine
    from swiftkv.loading import load_model, load_tokenizer

    settings = {"points": [p.name for p in points], "ttft_tokens": config.ttft_tokens,
                "serving_requests": config.serving_requests, "serving_output_tokens": config.serving_output_tokens,
                "serving_rate": config.serving_rate, "kv_cache_memory_gb": config.kv_cache_memory_gb,
                "speed_rounds": config.speed_rounds}
    cache = out_dir / "speed.json"
    if cache.is_file() and json.loads(cache.read_text())["settings"] == settings:
        return json.loads(cache.read_text())
    tokenizer = load_tokenizer(model)
    generator = torch.Generator().manual_seed(0)  # speed does not depend on the text: random token ids
    prompts = [torch.randint(len(tokenizer) // 4, len(tokenizer) // 2, (config.ttft_tokens,),
                             generator=generator).tolist() for _ in range(config.serving_requests)]
    arrivals = poisson_arrivals(config.serving_requests, config.serving_rate)
    systems = {"base": model, **{p.name: str(out_dir / "points" / p.name / "model") for p in points}}
    engines = {}  # per system: an engine for TTFT (the whole prompt in one step) and one for serving
    for name, path in tqdm(systems.items(), desc="speed: loading", unit="model"):
        loaded = load_model(path, dtype="bfloat16")
        if name == "base" and hasattr(loaded.config, "swiftkv"):
            loaded.config.swiftkv = False
        ttft_engine = LLMEngine(loaded, tokenizer, EngineConfig(kv_cache_memory_gb=config.kv_cache_memory_gb,
                                                                max_prefill_tokens=config.ttft_tokens))
        engine_ttft(ttft_engine, prompts[0][:64], 1)  # warm-up
        engines[name] = ttft_engine, LLMEngine(loaded, tokenizer,
                                               EngineConfig(kv_cache_memory_gb=config.kv_cache_memory_gb))
    times = {name: {"ttft_s": [], "serving_tokens_per_s": []} for name in systems}
    for _ in tqdm(range(config.speed_rounds), desc="speed: rounds", unit="round"):
        for name, (ttft_engine, serving_engine) in engines.items():
            times[name]["ttft_s"].append(engine_ttft(ttft_engine, prompts[0], 1))
            serving = serve_engine(serving_engine, prompts, arrivals, config.serving_output_tokens)
            times[name]["serving_tokens_per_s"].append(serving["total_token_throughput"])
    result = {"settings": settings, "threads": torch.get_num_threads(), "rounds": times}
    for name, measured in times.items():
        result[name] = {metric: statistics.median(values) for metric, values in measured.items()}
    cache.write_text(json.dumps(result, indent=2))
    return result


def frontier_row(point: Point, point_dir: Path, speed: dict, num_layers: int) -> dict:
    rows = json.loads((point_dir / "quality" / "eval.json").read_text())["rows"]
    report = json.loads((point_dir / "report.json").read_text())
    drops = quality_drops(rows)
    base, own = speed["base"], speed[point.name]
    return {"point": point.name, "num_key_value_layers": point.depth, "key_value_group_size": point.group_size,
            "prefill_compute_saved": (num_layers - point.depth) / num_layers,
            "ttft_s": own["ttft_s"], "ttft_speedup": base["ttft_s"] / own["ttft_s"],
            "serving_speedup": own["serving_tokens_per_s"] / base["serving_tokens_per_s"],
            "drop_points": drops, "drop_ci95_points": quality_drops(rows, with_ci=True),
            "worst_drop_points": max(drops.values(), default=0.0),
            "held_out_agreement": report.get("eval_top1_agreement_after"), "held_out_kl": report.get("eval_kl_after"),
            "eval_rows": rows}


def render_frontier(result: dict) -> str:
    points = result["points"]
    tasks = sorted({task for row in points for task in row["drop_points"]})
    other = sorted({(r["task"], r["metric"]) for row in points for r in row["eval_rows"]
                    if r["metric"] not in BUDGET_METRICS})
    header = (["point", "prefill saved", "TTFT speedup", "serving speedup", "held-out agreement"]
              + [f"{task} drop (pts)" for task in tasks] + [f"{task} {metric}" for task, metric in other])
    chosen = next((row for row in points if row["point"] == result["chosen"]), None)
    caveat = "" if chosen is None or chosen["ttft_speedup"] > 1 else (
        f" Its TTFT in this run, {chosen['ttft_speedup']:.2f}x the base's, is not measurably faster: the prefill it "
        f"saves ({chosen['prefill_compute_saved']:.0%}) is within the timing noise here.")
    lines = [f"# SwiftKV frontier of {result['model']}", "",
             f"Budget: at most {result['settings']['max_quality_drop']} accuracy points lost on every task. "
             f"Chosen: **{result['chosen'] or 'none within budget'}**.{caveat}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in points:
        values = {(r["task"], r["metric"]): r for r in row["eval_rows"]}

        def other_cell(task, metric):
            entry = values.get((task, metric))
            if entry is None:
                return ""
            base = f" (base {entry['baseline']['value']:.3g})" if entry["baseline"] else ""
            return f"{entry['model']['value']:.3g}{base}"

        agreement = row["held_out_agreement"]
        cells = [row["point"], f"{row['prefill_compute_saved']:.0%}", f"{row['ttft_speedup']:.2f}x",
                 f"{row['serving_speedup']:.2f}x", "" if agreement is None else f"{agreement:.3f}"]
        cells += [_drop_cell(row["drop_ci95_points"].get(task)) for task in tasks]
        cells += [other_cell(task, metric) for task, metric in other]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Drops are base minus SwiftKV in accuracy points with the 95% CI of the paired difference "
              "(negative: SwiftKV scored higher); each point's `quality/eval.md` has every metric. Speedups: the "
              "base engine and each point timed in one run.", ""]
    return "\n".join(lines)


def _drop_cell(drop: Optional[tuple]) -> str:
    if drop is None:
        return ""
    value, low, high = (round(v, 1) + 0.0 for v in drop)  # + 0.0: no "-0.0"
    return f"{value:+.1f} [{low:+.1f}, {high:+.1f}]"


def plot_frontier(result: dict, path: Path) -> None:
    from swiftkv.plotting import png_figure

    points = result["points"]
    with png_figure(path, 1, 2, figsize=(12, 4.5)) as (fig, axes):
        for axis, key, label in ((axes[0], "prefill_compute_saved", "prefill compute saved (share of layers)"),
                                 (axes[1], "ttft_speedup", "measured TTFT speedup vs base engine")):
            axis.plot([row[key] for row in points], [row["worst_drop_points"] for row in points], "o-")
            for row in points:
                chosen = row["point"] == result["chosen"]
                axis.annotate(row["point"] + (" (chosen)" if chosen else ""), (row[key], row["worst_drop_points"]),
                              textcoords="offset points", xytext=(4, 4), fontsize=8)
            axis.axhline(result["settings"]["max_quality_drop"], color="gray", linestyle="--", label="budget")
            axis.set_xlabel(label)
            axis.set_ylabel("worst task drop (accuracy points)")
            axis.legend()
        fig.suptitle(f"SwiftKV quality/speed frontier: {result['model']}")
