"""The server under faults and load, in-process: a failing request, a dying engine, slow clients, floods,
timeouts, keys. The engine is the tiny SwiftKV model, slowed down where a test needs requests in flight."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from starlette.testclient import TestClient

from swiftkv.serve.app import create_app
from swiftkv.serve.config import ServerConfig
from swiftkv.serve.server import make_server, run_server

from test_engine import engine_for, swiftkv_model
from test_server import MODEL, free_port

COMPLETION = {"model": MODEL, "prompt": "w1 w2", "max_tokens": 4, "temperature": 0, "ignore_eos": True}


def slow_engine(seconds_per_forward: float = 0.0, **options):
    engine = engine_for(swiftkv_model(), **options)
    forward = engine.runner.forward

    def slow_forward(batch):
        time.sleep(seconds_per_forward)
        return forward(batch)

    engine.runner.forward = slow_forward
    return engine


@contextmanager
def live_server(engine, **settings):
    """`swiftkv serve` on a thread: yields (base_url, exit_status list filled when the server stops)."""
    port = free_port()
    server = make_server(engine, MODEL, "127.0.0.1", port, ServerConfig(**{"shutdown_timeout_s": 1, **settings}))
    exit_status: list[int] = []
    thread = threading.Thread(target=lambda: exit_status.append(run_server(server)), daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline and thread.is_alive():
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", exit_status
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def metric(base_url: str, line_start: str) -> float:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    return 0.0


def wait_until(condition, seconds: float = 5.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_a_request_that_fails_in_the_engine_gets_500_and_the_others_continue():
    engine = slow_engine()
    forward = engine.runner.forward

    def fails_on_token_50(batch):
        if (batch.input_ids == 50).any():
            raise RuntimeError("planted failure")
        return forward(batch)

    engine.runner.forward = fails_on_token_50
    with live_server(engine) as (base_url, _):
        with httpx.Client(base_url=base_url, timeout=30) as client:
            failed = client.post("/v1/completions", json={**COMPLETION, "prompt": "w43 w2"})
            assert failed.status_code == 500
            assert "planted failure" in failed.json()["error"]["message"]
            assert client.post("/v1/completions", json=COMPLETION).status_code == 200
            assert client.get("/health").json() == {"status": "ok"}


def test_when_the_engine_thread_dies_requests_get_503_and_the_server_exits_with_status_1():
    engine = slow_engine()

    def broken_step():
        raise RuntimeError("planted engine bug")

    engine.step = broken_step
    with live_server(engine) as (base_url, exit_status):
        response = httpx.post(f"{base_url}/v1/completions", json=COMPLETION, timeout=30)
        assert response.status_code == 503 and "engine stopped" in response.json()["error"]["message"]
        assert wait_until(lambda: exit_status == [1], 10)


def test_health_is_503_once_the_engine_thread_is_dead():
    engine = slow_engine()
    engine.step = lambda: 1 / 0
    client = TestClient(create_app(engine, MODEL))
    assert client.get("/health").status_code == 200
    assert client.post("/v1/completions", json=COMPLETION).status_code == 503
    health = client.get("/health")
    assert health.status_code == 503 and "ZeroDivisionError" in health.json()["error"]
    assert client.post("/v1/completions", json=COMPLETION).status_code == 503  # refused at once, not hung


def test_a_non_streaming_client_that_disconnects_is_aborted_and_frees_its_blocks():
    engine = slow_engine(0.02)
    with live_server(engine) as (base_url, _):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base_url}/v1/completions", json={**COMPLETION, "max_tokens": 200}, timeout=0.5)
        assert wait_until(lambda: metric(base_url, 'swiftkv_request_success_total{finish_reason="abort"}') == 1)
        assert engine.blocks.usage == 0 and not engine.scheduler.has_unfinished()
        assert metric(base_url, "swiftkv_generation_tokens_total") < 100


def test_requests_beyond_the_queue_limit_get_429_with_retry_after_at_once():
    engine = slow_engine(0.01, max_num_seqs=1)
    with live_server(engine, max_queued_requests=2) as (base_url, _):
        async def one(client):
            started = time.perf_counter()
            response = await client.post("/v1/completions", json={**COMPLETION, "max_tokens": 20})
            return response, time.perf_counter() - started

        async def flood():
            async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
                return await asyncio.gather(*(one(client) for _ in range(8)))

        results = asyncio.run(flood())
    refused = [(r, seconds) for r, seconds in results if r.status_code == 429]
    served = [r for r, _ in results if r.status_code == 200]
    assert refused and served and len(refused) + len(served) == 8
    for response, seconds in refused:
        assert response.headers["retry-after"] == "1" and seconds < 0.1
        assert response.json()["error"]["type"] == "rate_limit_error"


def test_a_request_over_its_timeout_is_aborted_with_504():
    engine = slow_engine(0.02)
    with live_server(engine, request_timeout_s=0.5) as (base_url, _):
        started = time.perf_counter()
        response = httpx.post(f"{base_url}/v1/completions", json={**COMPLETION, "max_tokens": 200}, timeout=30)
        assert response.status_code == 504 and time.perf_counter() - started < 3
        body = {**COMPLETION, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=30) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data:")]
        assert '"code": 504' in lines[-2] and lines[-1] == "data: [DONE]"
        assert wait_until(lambda: engine.blocks.usage == 0 and not engine.scheduler.has_unfinished())


def test_an_api_key_guards_every_v1_route_but_not_health(monkeypatch):
    monkeypatch.setenv("SWIFTKV_API_KEY", "secret-key")
    client = TestClient(create_app(slow_engine(), MODEL, ServerConfig()))
    assert client.post("/v1/completions", json=COMPLETION).status_code == 401
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    right = client.post("/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer secret-key"})
    assert right.status_code == 200
    assert client.get("/health").status_code == 200


def test_tokenization_blocks_neither_the_event_loop_nor_running_streams():
    engine = slow_engine(0.01)
    tokenize = engine.tokenize

    def slow_tokenize(text):
        if text.startswith("w9"):
            time.sleep(2)
        return tokenize(text)

    engine.tokenize = slow_tokenize
    with live_server(engine) as (base_url, _):
        stream_body = {**COMPLETION, "prompt": "w1", "max_tokens": 150, "stream": True}
        arrivals: list[float] = []

        def read_stream():
            with httpx.stream("POST", f"{base_url}/v1/completions", json=stream_body, timeout=30) as response:
                arrivals.extend(time.perf_counter() for line in response.iter_lines() if line.startswith("data:"))

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert wait_until(lambda: len(arrivals) > 5)
        slow = threading.Thread(target=lambda: httpx.post(f"{base_url}/v1/completions",
                                                          json={**COMPLETION, "prompt": "w9 w2"}, timeout=30))
        slow.start()
        time.sleep(0.3)
        started = time.perf_counter()
        assert httpx.get(f"{base_url}/health", timeout=5).status_code == 200
        health_seconds = time.perf_counter() - started
        tokens_before = len(arrivals)
        time.sleep(1)
        tokens_during = len(arrivals) - tokens_before
        slow.join()
        reader.join()
    assert health_seconds < 0.5
    assert tokens_during > 10  # the stream kept going while the prompt was tokenized
