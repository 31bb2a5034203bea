"""What the schedule alone predicts for a serving run: the engine's scheduler replayed, each step costed.

`benchmarks/engine.py` measures serving throughput, but not why two systems differ. This replays the engine's
own `Scheduler` and `BlockManager` for the run's load (`--requests` prompts of `--input-len` tokens, each
generating `--output-len`, all arriving at once) at each system's measured KV capacity, and costs every step
with that system's own measurements from the same JSON:
  * a step's prompt tokens at the rate of its TTFT at the step budget's length (one prompt step, eager);
  * its decode rows at a + b x rows, fitted to its one-stream and `decode_batch`-stream decode.
If the predicted tokens/s match the measured ones, the schedule (how many requests fit at once, how prompt
chunks and decode rows share steps) explains the run; where a system falls short of its prediction, the time
is lost inside its steps, not in the schedule. Writes JSON and a PNG (measured against predicted).

    .venv/bin/python benchmarks/serving_schedule.py --engine-json benchmarks/results/engine_gpu_llama8b.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from swiftkv.engine.block_manager import BlockManager
from swiftkv.engine.config import EngineConfig
from swiftkv.engine.llm_engine import CPU_PREFILL_TOKENS, GPU_PREFILL_TOKENS
from swiftkv.engine.measure import poisson_arrivals
from swiftkv.engine.sampling_params import SamplingParams
from swiftkv.engine.scheduler import Scheduler
from swiftkv.engine.sequence import Sequence, Status
from swiftkv.plotting import png_figure


def step_costs(row: dict, prefill_tokens: int, decode_batch: int) -> tuple[float, float, float]:
    """(seconds per prompt token, seconds per step, seconds per decode row) from one system's measurements."""
    ttft = row["ttft_s"]
    length = min(ttft, key=lambda n: abs(int(n) - prefill_tokens))  # the TTFT nearest one full prompt step
    one = row["decode_1"]["ms_per_token_per_stream"] / 1000
    many = row[f"decode_{decode_batch}"]["ms_per_token_per_stream"] / 1000
    per_row = (many - one) / (decode_batch - 1)
    return ttft[length] / int(length), one - per_row, per_row


def replay(capacity_tokens: int, requests: int, input_len: int, output_len: int, prefill_tokens: int,
           costs: tuple[float, float, float], block_size: int = 16) -> dict:
    """The scheduler's steps for the load, and their predicted seconds."""
    per_token, per_step, per_row = costs
    config = EngineConfig(max_prefill_tokens=prefill_tokens, block_size=block_size)
    scheduler = Scheduler(config, BlockManager(capacity_tokens // block_size, block_size, first_block=1), set())
    for _ in range(requests):
        scheduler.add(Sequence([0] * input_len, SamplingParams(max_tokens=output_len, ignore_eos=True)))
    seconds, steps, prompt_steps, most_rows = 0.0, 0, 0, 0
    while scheduler.has_unfinished():
        chunks = scheduler.schedule().chunks
        rows = sum(chunk.sequence.status is Status.RUNNING for chunk in chunks)
        prompt = sum(map(len, chunks)) - rows
        # a step with prompt tokens costs their share of a full prompt step; one without, a decode step
        seconds += prompt * per_token + rows * per_row if prompt else per_step + rows * per_row
        steps, prompt_steps, most_rows = steps + 1, prompt_steps + bool(prompt), max(most_rows, rows)
        for chunk in chunks:
            scheduler.ran(chunk)
            if chunk.wants_logits:
                scheduler.postprocess(chunk.sequence, 0, seconds)
    return {"steps": steps, "prompt_steps": prompt_steps, "decode_only_steps": steps - prompt_steps,
            "most_decode_rows": most_rows, "predicted_duration_s": seconds,
            "predicted_total_token_throughput": requests * (input_len + output_len) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine-json", default="benchmarks/results/engine_gpu_llama8b.json")
    parser.add_argument("--out", default="benchmarks/results/serving_schedule_gpu_llama8b")
    args = parser.parse_args()

    run = json.loads(Path(args.engine_json).read_text())
    settings = run["settings"]
    prefill_tokens = GPU_PREFILL_TOKENS if settings["device"].startswith("cuda") else CPU_PREFILL_TOKENS
    results = {"engine_json": args.engine_json, "device": run["device"], "load": {
        key: settings[key] for key in ("requests", "input_len", "output_len", "request_rate")},
        "prefill_tokens_per_step": prefill_tokens, "systems": {}}
    for name, row in run["systems"].items():
        if "serving" not in row or "ttft_s" not in row or "decode_1" not in row:
            continue
        last_arrival = poisson_arrivals(settings["requests"], settings["request_rate"])[-1]  # as engine.py drew them
        if last_arrival > 0.05 * row["serving"]["duration_s"]:
            print(f"skipping {name}: its requests arrived over {last_arrival:.1f} s of a "
                  f"{row['serving']['duration_s']:.1f} s run, and the replay assumes they arrive at once")
            continue
        costs = step_costs(row, prefill_tokens, settings["decode_batch"])
        result = replay(row["kv_cache_capacity_tokens"], settings["requests"], settings["input_len"],
                        settings["output_len"], prefill_tokens, costs)
        result.update(kv_cache_capacity_tokens=row["kv_cache_capacity_tokens"],
                      cost_model={"prompt_s_per_token": costs[0], "decode_step_s": costs[1], "decode_row_s": costs[2]},
                      measured_duration_s=row["serving"]["duration_s"],
                      measured_total_token_throughput=row["serving"]["total_token_throughput"])
        result["measured_over_predicted"] = (result["measured_total_token_throughput"]
                                             / result["predicted_total_token_throughput"])
        results["systems"][name] = result
        print(f"{name}: capacity {result['kv_cache_capacity_tokens']} tokens, {result['steps']} steps "
              f"({result['prompt_steps']} with prompts, up to {result['most_decode_rows']} decode rows); "
              f"predicted {result['predicted_total_token_throughput']:,.0f} tokens/s, measured "
              f"{result['measured_total_token_throughput']:,.0f} ({result['measured_over_predicted']:.2f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    with png_figure(out.with_suffix(".png"), figsize=(8, 4.5)) as (_, axis):
        names = list(results["systems"])
        for offset, (key, label) in enumerate((("predicted_total_token_throughput", "predicted by the schedule"),
                                               ("measured_total_token_throughput", "measured"))):
            axis.bar([i + 0.4 * offset for i in range(len(names))], [results["systems"][n][key] for n in names],
                     width=0.4, label=label)
        axis.set_xticks([i + 0.2 for i in range(len(names))], names)
        axis.set_ylabel("total tokens/s")
        axis.set_title(f"serving {settings['requests']} x ({settings['input_len']} in / {settings['output_len']} "
                       f"out), {run['device']}")
        axis.legend()
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
