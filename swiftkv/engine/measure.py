"""Timing the engine as its users see it: time to first token, and serving under Poisson arrivals with the
metrics `vllm bench serve` reports (used by benchmarks/engine.py and `swiftkv search`)."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from swiftkv.engine.llm_engine import LLMEngine, request_output
from swiftkv.engine.sampling_params import SamplingParams


def engine_ttft(engine: LLMEngine, prompt: list[int], repeats: int) -> float:
    """Median seconds from adding `prompt` to its first token, over `repeats` runs."""
    times = []
    for _ in range(repeats):
        sequence = engine.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
        times.append(request_output(sequence).ttft_s)
    return statistics.median(times)


def poisson_arrivals(requests: int, rate: float, seed: int = 0) -> list[float]:
    """Seconds after the first request at which each request arrives (the first at 0)."""
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, requests)).tolist()
    return [arrival - arrivals[0] for arrival in arrivals]


def serve_engine(engine: LLMEngine, prompts: list[list[int]], arrivals: list[float], output_len: int) -> dict:
    """Replay `prompts` arriving at `arrivals` into the engine in-process; serving metrics of the run."""
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    device = engine.runner.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        retries = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
    sequences, pending, start = [], list(zip(arrivals, prompts)), time.perf_counter()
    steps = {kind: {"count": 0, "seconds": 0.0, "decode_rows": 0, "prompt_tokens": 0} for kind in ("prompt", "decode")}
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            arrival, prompt = pending.pop(0)
            sequence = engine.add_request(prompt, params)
            sequence.arrival_time = start + arrival
            sequences.append(sequence)
        if engine.has_unfinished():
            began = time.perf_counter()
            engine.step()
            ran = engine.last_step
            totals = steps["prompt" if ran.prompt_tokens else "decode"]
            totals["count"] += 1
            totals["seconds"] += time.perf_counter() - began
            totals["decode_rows"] += ran.decode_rows
            totals["prompt_tokens"] += ran.prompt_tokens
        elif pending:
            time.sleep(min(0.01, pending[0][0] - now))
    metrics = serving_metrics(sequences, time.perf_counter() - start, output_len)
    metrics["steps"] = steps  # where the time went: steps with prompt chunks (and decode rows), decode-only steps
    if device.type == "cuda":  # allocations that failed, freed the allocator's cache and synced: memory pressure
        metrics["cuda_alloc_retries"] = torch.cuda.memory_stats(device).get("num_alloc_retries", 0) - retries
        metrics["cuda_peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
    return metrics


def serving_metrics(sequences, duration: float, output_len: int) -> dict:
    ttft = [s.first_token_time - s.arrival_time for s in sequences]
    tpot = [(s.token_times[-1] - s.token_times[0]) / (len(s.token_times) - 1) for s in sequences]
    itl = [b - a for s in sequences for a, b in zip(s.token_times, s.token_times[1:])]
    result = throughput_metrics(ttft, tpot, itl, duration, len(sequences), sum(s.num_prompt_tokens for s in sequences),
                                output_len)
    result["preemptions"] = sum(s.num_preemptions for s in sequences)
    return result


def summarize(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "median": float(np.median(values)), "p99": float(np.percentile(values, 99))}


def throughput_metrics(ttft, tpot, itl, duration, requests, input_tokens, output_len) -> dict:
    return {"duration_s": duration, "completed": requests,
            "request_throughput": requests / duration,
            "output_throughput": requests * output_len / duration,
            "total_token_throughput": (input_tokens + requests * output_len) / duration,
            "ttft_ms": {k: 1000 * v for k, v in summarize(ttft).items()},
            "tpot_ms": {k: 1000 * v for k, v in summarize(tpot).items()},
            "itl_ms": {k: 1000 * v for k, v in summarize(itl).items()}}
