"""Prometheus metrics, named after vLLM's where they mean the same thing."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from swiftkv.engine.llm_engine import LLMEngine, TokenEvent

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.registry = CollectorRegistry()
        self.ttft = Histogram("swiftkv_time_to_first_token_seconds", "Time to first token", registry=self.registry,
                              buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("swiftkv_time_per_output_token_seconds", "Time between output tokens",
                              registry=self.registry, buckets=LATENCY_BUCKETS)
        self.requests = Counter("swiftkv_request_success", "Finished requests", ["finish_reason"],
                                registry=self.registry)
        self.prompt_tokens = Counter("swiftkv_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.generation_tokens = Counter("swiftkv_generation_tokens", "Tokens generated", registry=self.registry)
        Gauge("swiftkv_num_requests_waiting", "Requests waiting for prefill", registry=self.registry).set_function(
            lambda: len(engine.scheduler.waiting))
        Gauge("swiftkv_num_requests_running", "Requests decoding", registry=self.registry).set_function(
            lambda: len(engine.scheduler.running))
        Gauge("swiftkv_kv_cache_usage_perc", "Share of KV cache blocks in use", registry=self.registry).set_function(
            lambda: engine.blocks.usage)
        self.rejected = Counter("swiftkv_request_rejected", "Requests refused before they reached the engine",
                                ["reason"], registry=self.registry)
        Gauge("swiftkv_kv_cache_capacity_tokens", "Tokens the KV cache holds", registry=self.registry).set(
            engine.capacity_tokens)

    def observe(self, event: TokenEvent) -> None:
        """Called on the engine thread for every produced token and every ended request."""
        sequence = event.sequence
        if event.token_id >= 0:  # aborted and failed requests end with an event that carries no token
            self.generation_tokens.inc()
            times = sequence.token_times
            if len(times) == 1:
                self.ttft.observe(times[0] - sequence.arrival_time)
                self.prompt_tokens.inc(sequence.num_prompt_tokens)
            else:
                self.tpot.observe(times[-1] - times[-2])
        if event.finished:
            self.requests.labels(sequence.finish_reason).inc()
