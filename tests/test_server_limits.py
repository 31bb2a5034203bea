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
        answered: list[httpx.Response] = []  # in the order the answers arrived

        async def one(client):
            answered.append(await client.post("/v1/completions", json={**COMPLETION, "max_tokens": 20}))

        async def flood():
            async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
                await asyncio.gather(*(one(client) for _ in range(8)))

        asyncio.run(flood())
    statuses = [r.status_code for r in answered]
    assert set(statuses) == {200, 429}
    # refused at once: every 429 came back before the first admitted request finished
    assert statuses.index(200) > max(i for i, status in enumerate(statuses) if status == 429)
    for response in answered:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "rate_limit_error"


def test_a_request_over_its_timeout_is_aborted_with_504():
    engine = slow_engine(0.02)
    with live_server(engine, request_timeout_s=0.5) as (base_url, _):
        # 200 tokens at 20 ms per step would take 4 s: a 504 means the request was cut at its timeout
        response = httpx.post(f"{base_url}/v1/completions", json={**COMPLETION, "max_tokens": 200}, timeout=30)
        assert response.status_code == 504
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
    tokenizing, tokenized = threading.Event(), threading.Event()
    window: list[float] = []  # when the slow tokenization started and ended

    def slow_tokenize(text):
        if text.startswith("w9"):
            window.append(time.perf_counter())
            tokenizing.set()
            time.sleep(2)
            window.append(time.perf_counter())
            tokenized.set()
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
        assert tokenizing.wait(10)
        assert httpx.get(f"{base_url}/health", timeout=30).status_code == 200
        health_answered_mid_tokenization = not tokenized.is_set()
        slow.join()
        reader.join()
    assert health_answered_mid_tokenization
    # the stream kept producing tokens while the prompt was being tokenized
    assert len([t for t in arrivals if window[0] < t < window[1]]) > 1
