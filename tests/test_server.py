"""The OpenAI-compatible server, as a real process on localhost, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from swiftkv.checkpoint import save_checkpoint
from swiftkv.convert import convert_to_swiftkv

from conftest import make_base_model, make_tiny_tokenizer, perturb_swiftkv_weights

MODEL = "tiny-swiftkv"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("server") / "ckpt"
    model = convert_to_swiftkv(make_base_model("llama"), 3)
    perturb_swiftkv_weights(model)
    save_checkpoint(model, path, make_tiny_tokenizer())
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "swiftkv.cli", "serve", str(path), "--port", str(port),
                                "--served-model-name", MODEL, "--dtype", "float32", "--kv-cache-memory-gb", "0.01",
                                "--block-size", "4"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base_url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
        if process.poll() is not None:
            raise RuntimeError(process.stdout.read())
    yield base_url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def metric(server, name: str) -> float:
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_returns_text_and_usage(client):
    response = client.completions.create(model=MODEL, prompt="w1 w2 w3", max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert response.usage.prompt_tokens == 3 and response.usage.completion_tokens == 5
    assert response.choices[0].finish_reason == "length" and response.choices[0].text.strip()


def test_streamed_chat_equals_the_unstreamed_answer(client):
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = [chunk.choices[0].delta.content or "" for chunk in stream]
    assert len(chunks) > 1 and "".join(chunks) == whole.choices[0].message.content


@pytest.mark.parametrize("body, status, message", [
    ({"model": "other", "prompt": "w1"}, 404, "model 'other' does not exist"),
    ({"model": MODEL, "prompt": "w1", "max_tokens": -3}, 400, "max_tokens must be a positive integer"),
    ({"model": MODEL, "prompt": "w1", "temperature": -1}, 400, "temperature must be >= 0"),
    ({"model": MODEL, "prompt": "w1", "top_p": 2}, 400, "top_p must be in (0, 1]"),
    ({"model": MODEL, "prompt": "w1 " * 300}, 400, "exceeds the model's context of 256 tokens"),
    ({"model": MODEL}, 400, "prompt: Field required"),
])
def test_bad_requests_get_a_clear_4xx(server, body, status, message):
    response = httpx.post(f"{server}/v1/completions", json=body)
    assert response.status_code == status
    assert message in response.json()["error"]["message"]


def test_malformed_json_gets_400(server):
    response = httpx.post(f"{server}/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "invalid request" in response.json()["error"]["message"]


def test_client_disconnect_mid_stream_frees_its_kv_blocks(server):
    body = {"model": MODEL, "prompt": "w1 w2", "max_tokens": 200, "stream": True, "ignore_eos": True,
            "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break
    deadline = time.time() + 30
    while time.time() < deadline and (metric(server, "swiftkv_kv_cache_usage_perc") > 0
                                      or metric(server, "swiftkv_num_requests_running") > 0):
        time.sleep(0.1)
    assert metric(server, "swiftkv_kv_cache_usage_perc") == 0
    assert metric(server, "swiftkv_num_requests_running") == 0


def test_server_survives_100_concurrent_clients(server):
    async def one(client, index):
        response = await client.completions.create(model=MODEL, prompt=f"w{index % 80} w3", max_tokens=4,
                                                   temperature=0.8, seed=index)
        return response.choices[0].finish_reason

    async def all_clients():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(100)))

    reasons = asyncio.run(all_clients())
    assert len(reasons) == 100 and set(reasons) <= {"length", "stop"}
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert metric(server, "swiftkv_time_to_first_token_seconds_count") >= 100
