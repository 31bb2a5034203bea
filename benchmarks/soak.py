"""Soak test of `swiftkv serve`: minutes of load at twice what the KV cache holds, plus hostile requests.

Starts the real server (a process, as users run it) on SmolLM2-135M converted to SwiftKV-50%, then, for
`--duration` seconds:
  * `--clients` closed-loop streaming chat clients (default: enough prompts + answers to fill the KV cache
    twice over), each sending a WikiText-2 passage with an instruction; a 429 makes it wait Retry-After;
  * a prober that GETs /health every 0.25 s;
  * a hostile client that cycles through a 20 MB body, an out-of-vocabulary token id, a NaN temperature,
    malformed JSON and a non-streaming client that hangs up mid-request;
  * a monitor that samples the server's RSS and its queue (/metrics) every second.
Then SIGTERM, timed. Pass criteria (issue #17): 429s answered within 100 ms, /health p99 < 100 ms, RSS growth
after the warm-up < 10% (mean of the last 30 s against the first 30 s), the server never restarts or reports
unhealthy, every accepted request completes, every hostile request gets its expected answer.
Writes JSON and a PNG (queue depth, TTFT, RSS over time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from swiftkv.eval.data import data_file
from swiftkv.loading import DEFAULT_MODEL
from swiftkv.plotting import png_figure

MODEL_NAME = "soak"
RSS_WINDOW_S = 30  # RSS growth compares the mean of the first and the last 30 s after the warm-up
HOSTILE_CASES = ("20MB body", "token id 10**9", "NaN temperature", "malformed JSON", "client hangs up")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metrics(client: httpx.Client) -> dict[str, float]:
    values = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("swiftkv_") and " " in line and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def chat_prompts(count: int, seed: int) -> list[str]:
    """Prompt-heavy requests: a WikiText-2 passage (200-1200 characters) and an instruction about it."""
    rng = random.Random(seed)
    text = data_file("wikitext2_test_raw.txt").read_text()
    questions = [json.loads(line)["prompt"] for line in data_file("prompts_alpaca_eval.jsonl").read_text().splitlines()]
    prompts = []
    for _ in range(count):
        start = rng.randrange(len(text) - 2000)
        passage = text[start:start + rng.randint(200, 1200)]
        prompts.append(f"{passage}\n\nSummarize the passage above in two sentences, then answer: "
                       f"{rng.choice(questions)}")
    return prompts


def start_server(model: str, port: int, args) -> subprocess.Popen:
    command = [sys.executable, "-m", "swiftkv.cli", "serve", model, "--port", str(port), "--served-model-name",
               MODEL_NAME, "--kv-cache-memory-gb", str(args.kv_cache_memory_gb),
               "--max-queued-requests", str(args.max_queued_requests),
               "--heap-trim-interval", str(args.heap_trim_interval)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited:\n{process.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not start within 300 s")


def warm_up(base_url: str, prompt: str) -> None:
    """One request before the clock starts, as a deployment's readiness check would send: the first request
    pays one-off costs (compiling the chat template, first kernels) that are not the server under load."""
    body = {"model": MODEL_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": prompt}]}
    httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=300).raise_for_status()


class Soak:
    def __init__(self, base_url: str, pid: int, args, capacity_tokens: int):
        self.base_url, self.pid, self.args = base_url, pid, args
        self.started = self.stop_at = 0.0  # set when the load starts
        self.requests: list[dict] = []       # one per streamed chat request
        self.health: list[tuple[float, float, int]] = []  # (t, seconds, status)
        self.samples: list[dict] = []        # RSS and queue, once a second
        self.hostile: list[dict] = []
        self.capacity_tokens = capacity_tokens
        # bodies encoded now: JSON-encoding 20 MB during the run would stall this process's event loop
        self.hostile_cases = {
            "20MB body": dict(content=json.dumps({"model": MODEL_NAME, "prompt": "x " * 10_000_000}).encode(),
                              expect=(413,)),
            # valid JSON that passes the cheap checks may meet a full queue first: 429 is right then too
            "token id 10**9": dict(content=json.dumps({"model": MODEL_NAME, "prompt": [10**9], "max_tokens": 4}),
                                   expect=(400, 429)),
            "NaN temperature": dict(content=f'{{"model": "{MODEL_NAME}", "prompt": "hi", "temperature": NaN}}',
                                    expect=(400,)),
            "malformed JSON": dict(content="{not json", expect=(400,)),
        }

    def now(self) -> float:
        return time.perf_counter() - self.started

    async def client(self, http: httpx.AsyncClient, index: int, prompts: list[str]) -> None:
        rng = random.Random(index)
        while time.perf_counter() < self.stop_at:
            body = {"model": MODEL_NAME, "stream": True, "max_tokens": self.args.max_tokens,
                    "temperature": 0.7, "seed": rng.randrange(2**31),
                    "messages": [{"role": "user", "content": rng.choice(prompts)}]}
            record = {"t": self.now(), "client": index}
            sent = time.perf_counter()
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                record["status"] = response.status_code
                if response.status_code == 429:
                    await response.aread()
                    record["seconds"] = time.perf_counter() - sent
                    self.requests.append(record)
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                    continue
                chunks, done, finish = 0, False, None
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        payload = json.loads(line[6:])
                        if "error" in payload:
                            record["error"] = payload["error"]["message"]
                            continue
                        if chunks == 0:
                            record["ttft"] = time.perf_counter() - sent
                        chunks += 1
                        finish = payload["choices"][0].get("finish_reason") or finish
                record.update(seconds=time.perf_counter() - sent, chunks=chunks, done=done, finish=finish)
            self.requests.append(record)

    async def prober(self, http: httpx.AsyncClient) -> None:
        while time.perf_counter() < self.stop_at:
            sent = time.perf_counter()
            try:
                status = (await http.get("/health")).status_code
            except httpx.HTTPError:
                status = 0
            self.health.append((self.now(), time.perf_counter() - sent, status))
            await asyncio.sleep(0.25)

    async def monitor(self, http: httpx.Client) -> None:
        while time.perf_counter() < self.stop_at:
            values = await asyncio.to_thread(metrics, http)
            self.samples.append({"t": self.now(), "rss_mb": rss_mb(self.pid),
                                 "waiting": values.get("swiftkv_num_requests_waiting", 0),
                                 "running": values.get("swiftkv_num_requests_running", 0),
                                 "kv_usage": values.get("swiftkv_kv_cache_usage_perc", 0)})
            await asyncio.sleep(1.0)

    async def hostile_client(self, http: httpx.AsyncClient) -> None:
        for case in _cycle(HOSTILE_CASES):
            await asyncio.sleep(self.args.hostile_every)
            if time.perf_counter() >= self.stop_at:
                return
            sent = time.perf_counter()
            if case == "client hangs up":  # a non-streaming client gone after 0.5 s: the server aborts it
                try:
                    status = (await http.post("/v1/completions", timeout=0.5, json={
                        "model": MODEL_NAME, "prompt": "Tell me a long story.", "max_tokens": 200})).status_code
                except httpx.TimeoutException:
                    status = "hung up"
                self.hostile.append({"t": self.now(), "case": case, "status": status,
                                     "ok": status in ("hung up", 429)})
                continue
            spec = dict(self.hostile_cases[case])
            expect = spec.pop("expect")
            response = await http.post("/v1/completions", headers={"content-type": "application/json"}, **spec)
            self.hostile.append({"t": self.now(), "case": case, "status": response.status_code,
                                 "seconds": time.perf_counter() - sent, "ok": response.status_code in expect})

    async def run(self, prompts: list[str]) -> None:
        # clients made before the clock starts: each one builds an SSL context (~20 ms of this process's
        # event loop), which would otherwise show up as server latency in the first second
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=600, limits=limits) as load, \
                httpx.AsyncClient(base_url=self.base_url, timeout=30) as probe, \
                httpx.AsyncClient(base_url=self.base_url, timeout=120) as hostile:
            with httpx.Client(base_url=self.base_url, timeout=30) as monitor:
                self.started = time.perf_counter()
                self.stop_at = self.started + self.args.duration
                await asyncio.gather(self.prober(probe), self.monitor(monitor), self.hostile_client(hostile),
                                     *(self.client(load, i, prompts) for i in range(self.args.clients)))


def _cycle(items):
    while True:
        yield from items


def percentile(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(soak: Soak, args, shutdown_seconds: float, exit_status: int, clients: int) -> dict:
    warm = [s["rss_mb"] for s in soak.samples if s["t"] >= args.warmup]
    window = max(1, min(RSS_WINDOW_S, len(warm) // 2))  # samples are 1 s apart
    rss_start, rss_end = float(np.mean(warm[:window])), float(np.mean(warm[-window:]))
    rejected = [r for r in soak.requests if r["status"] == 429]
    accepted = [r for r in soak.requests if r["status"] != 429]
    completed = [r for r in accepted if r["status"] == 200 and r.get("done") and "error" not in r
                 and r.get("finish") in ("stop", "length")]
    health_seconds = [seconds for _, seconds, _ in soak.health]
    unhealthy = [status for _, _, status in soak.health if status != 200]
    ttft = [r["ttft"] for r in completed if "ttft" in r]
    criteria = {
        "429 within 100 ms": bool(rejected) and max(r["seconds"] for r in rejected) < 0.1,
        "/health p99 < 100 ms": percentile(health_seconds, 99) < 0.1,
        "RSS growth after warm-up < 10%": rss_end / rss_start - 1 < 0.10,
        "no restart, never unhealthy": not unhealthy and exit_status in (0, -signal.SIGTERM),
        "every accepted request completes": len(completed) == len(accepted),
        "hostile requests answered as expected": all(h["ok"] for h in soak.hostile),
    }
    return {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs", "model": args.model,
        "duration_s": args.duration, "warmup_s": args.warmup, "clients": clients, "max_tokens": args.max_tokens,
        "kv_cache_memory_gb": args.kv_cache_memory_gb, "kv_capacity_tokens": soak.capacity_tokens,
        "heap_trim_interval_s": args.heap_trim_interval,
        "max_queued_requests": args.max_queued_requests,
        "requests": {"accepted": len(accepted), "completed": len(completed), "rejected_429": len(rejected)},
        "rejected_429_seconds": {"p50": percentile([r["seconds"] for r in rejected], 50),
                                 "max": max((r["seconds"] for r in rejected), default=None)},
        "health_seconds": {"p50": percentile(health_seconds, 50), "p99": percentile(health_seconds, 99),
                           "max": max(health_seconds), "checks": len(health_seconds), "unhealthy": len(unhealthy)},
        "ttft_seconds": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
        "rss_mb": {"after_warmup": rss_start, "end": rss_end, "max": max(s["rss_mb"] for s in soak.samples),
                   "growth": rss_end / rss_start - 1, "averaged_over_s": window},
        "hostile": {case: [h["status"] for h in soak.hostile if h["case"] == case] for case in HOSTILE_CASES},
        "shutdown_seconds": shutdown_seconds, "exit_status": exit_status,
        "criteria": criteria, "passed": all(criteria.values()),
        "samples": soak.samples, "health": soak.health,
        "request_log": [{k: r.get(k) for k in ("t", "status", "ttft", "seconds", "finish")} for r in soak.requests],
    }


def plot(result: dict, path: Path) -> None:
    with png_figure(path, 3, 1, figsize=(10, 9), sharex=True) as (fig, (queue, ttft, rss)):
        t = [s["t"] for s in result["samples"]]
        queue.plot(t, [s["waiting"] for s in result["samples"]], label="waiting (prefill not started)")
        queue.plot(t, [s["running"] for s in result["samples"]], label="running")
        rejected = [r["t"] for r in result["request_log"] if r["status"] == 429]
        queue.plot(rejected, [0] * len(rejected), "|", color="red", markersize=12, label="429 answered")
        queue.axhline(result["max_queued_requests"], color="grey", ls="--", lw=0.8, label="--max-queued-requests")
        queue.set_ylabel("requests")
        queue.legend(loc="upper right", fontsize=8)
        queue.set_title(f"swiftkv serve soak: {result['clients']} clients, KV holds {result['kv_capacity_tokens']} "
                        f"tokens, {result['requests']['completed']} completed, "
                        f"{result['requests']['rejected_429']} x 429; passed: {result['passed']}")
        served = [r for r in result["request_log"] if r.get("ttft") is not None]
        ttft.plot([r["t"] for r in served], [r["ttft"] for r in served], ".", ms=3, label="TTFT per request")
        health_t, health_s, _ = zip(*result["health"])
        ttft.plot(health_t, health_s, lw=0.6, color="green", label="/health latency")
        ttft.set_yscale("log")
        ttft.set_ylabel("seconds")
        ttft.legend(loc="upper right", fontsize=8)
        rss.plot(t, [s["rss_mb"] for s in result["samples"]])
        rss.axvline(result["warmup_s"], color="grey", ls="--", lw=0.8)
        rss.set_ylabel("server RSS (MB)")
        rss.set_xlabel("seconds since the load started (dashed: end of warm-up)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint to serve (default: SmolLM2-135M converted to SwiftKV-50%%)")
    parser.add_argument("--duration", type=float, default=300, help="seconds of load (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=60, help="seconds before RSS growth is measured")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=0.05)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, help="default: twice the requests the KV cache holds")
    parser.add_argument("--max-queued-requests", type=int, help="default: half the requests the KV cache holds")
    parser.add_argument("--heap-trim-interval", type=float, default=5.0,
                        help="the server's --heap-trim-interval (0: off, to see RSS without it)")
    parser.add_argument("--hostile-every", type=float, default=10.0, help="seconds between hostile requests")
    parser.add_argument("--out", default="benchmarks/results/soak", help="writes OUT.json and OUT.png")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        label = args.model
        if args.model is None:
            label = f"{DEFAULT_MODEL} converted to SwiftKV-50% (untrained: load does not depend on weights)"
            args.model = str(Path(scratch) / "smollm2-swiftkv-50")
            subprocess.run([sys.executable, "-m", "swiftkv.cli", "convert", "--model", DEFAULT_MODEL,
                            "--num-key-value-layers", "0.5", "--dtype", "bfloat16", "--out", args.model], check=True)
        from swiftkv.loading import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        prompts = chat_prompts(200, seed=0)
        mean_tokens = np.mean([len(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True))
                               for p in prompts[:50]]) + args.max_tokens
        port = free_port()
        probe_args = argparse.Namespace(**{**vars(args), "max_queued_requests": args.max_queued_requests or 1000})
        server = start_server(args.model, port, probe_args)
        base_url = f"http://127.0.0.1:{port}"
        capacity = int(metrics(httpx.Client(base_url=base_url))["swiftkv_kv_cache_capacity_tokens"])
        held = max(1, int(capacity // mean_tokens))
        if args.max_queued_requests is None:  # restart with the limit derived from the capacity
            server.terminate()
            server.wait()
            args.max_queued_requests = max(1, held // 2)
            server = start_server(args.model, port, args)
        clients = args.clients or 2 * held
        args.clients = clients
        print(f"KV cache holds {capacity} tokens = ~{held} requests of ~{mean_tokens:.0f} tokens; {clients} clients, "
              f"queue limit {args.max_queued_requests}, {args.duration:.0f} s")
        warm_up(base_url, prompts[0])
        soak = Soak(base_url, server.pid, args, capacity)
        try:
            asyncio.run(soak.run(prompts))
            started = time.perf_counter()
            server.send_signal(signal.SIGTERM)
            exit_status = server.wait(timeout=60)
            shutdown = time.perf_counter() - started
        finally:
            server.kill()
    result = summarize(soak, args, shutdown, exit_status, clients)
    result["model"] = label
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "health", "request_log")}, indent=1))


if __name__ == "__main__":
    main()
