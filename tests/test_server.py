"""The OpenAI-compatible server, as a real process on localhost, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import signal
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
                                "--block-size", "4", "--max-queued-requests", "128"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    ({"model": MODEL, "prompt": "w1", "temperature": -1}, 400, "temperature must be a finite number >= 0"),
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


def normal_completion_works(server) -> bool:
    response = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "w1 w2", "max_tokens": 3,
                                                            "temperature": 0, "ignore_eos": True}, timeout=30)
    return response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("prompt", [[999999999], [-5], [5, 96], [[3, 4], [7, 10**12]]])
def test_out_of_vocabulary_token_ids_get_400_and_the_engine_keeps_serving(server, prompt):
    response = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
    assert response.status_code == 400
    assert "is not in the model's vocabulary [0, 96)" in response.json()["error"]["message"]
    assert normal_completion_works(server)
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


@pytest.mark.parametrize("raw_value", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_temperature_gets_400_and_the_engine_keeps_serving(server, raw_value):
    body = f'{{"model": "{MODEL}", "prompt": "w1", "max_tokens": 2, "temperature": {raw_value}}}'
    response = httpx.post(f"{server}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "temperature must be a finite number" in response.json()["error"]["message"]
    assert normal_completion_works(server)


def test_a_vanishing_temperature_samples_greedily(server):
    body = {"model": MODEL, "prompt": "w1 w2", "max_tokens": 4, "ignore_eos": True}
    tiny = httpx.post(f"{server}/v1/completions", json={**body, "temperature": 1e-300}, timeout=30)
    greedy = httpx.post(f"{server}/v1/completions", json={**body, "temperature": 0}, timeout=30)
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    assert normal_completion_works(server)


@pytest.mark.parametrize("seed, status", [(2**64, 400), (-2**63 - 1, 400), (2**64 - 1, 200), (-1, 200)])
def test_seeds_torch_cannot_hold_get_400(server, seed, status):
    response = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "w1", "max_tokens": 2,
                                                            "temperature": 1.0, "seed": seed}, timeout=30)
    assert response.status_code == status
    if status == 400:
        assert "seed must be an integer in [-2**63, 2**64 - 1]" in response.json()["error"]["message"]


def test_an_undecodable_body_gets_an_openai_error_object(server):
    response = httpx.post(f"{server}/v1/completions", content=b'{"model": "\xff\xfe"}',
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and set(response.json()) == {"error"}


def test_a_body_over_the_size_limit_gets_413_without_being_parsed(server):
    response = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "w1 " * 2_000_000}, timeout=60)
    assert response.status_code == 413 and "request body exceeds" in response.json()["error"]["message"]
    assert normal_completion_works(server)


def test_a_prompt_over_the_character_limit_gets_400_before_tokenizing(server):
    # 256 tokens of context x 16 characters: a longer prompt cannot fit whatever it tokenizes to
    response = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "w1 " * 1400})
    assert response.status_code == 400 and "at most 4096 (--max-prompt-chars)" in response.json()["error"]["message"]


def test_chat_content_may_be_a_list_of_text_parts_or_null(client):
    parts = client.chat.completions.create(
        model=MODEL, max_tokens=3, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": "w5 "}, {"type": "text", "text": "w6"}]}])
    plain = client.chat.completions.create(model=MODEL, max_tokens=3, temperature=0, extra_body={"ignore_eos": True},
                                           messages=[{"role": "user", "content": "w5 w6"}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    empty = client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, messages=[
        {"role": "user", "content": "w5"}, {"role": "assistant", "content": None}, {"role": "user", "content": "w6"}])
    assert empty.choices[0].finish_reason in ("stop", "length")


def test_image_content_parts_get_400(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
    response = httpx.post(f"{server}/v1/chat/completions", json=body)
    assert response.status_code == 400 and "'image_url' are not supported" in response.json()["error"]["message"]


def test_a_list_of_prompts_gets_one_choice_per_prompt(client):
    response = client.completions.create(model=MODEL, prompt=["w1 w2", "w7 w8 w9"], max_tokens=3, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1]
    single = client.completions.create(model=MODEL, prompt="w7 w8 w9", max_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert response.choices[1].text == single.choices[0].text
    assert response.usage.prompt_tokens == 5 and response.usage.completion_tokens == 6


def test_completion_logprobs_report_the_sampled_tokens_and_the_top_k(client):
    response = client.completions.create(model=MODEL, prompt="w1 w2", max_tokens=4, temperature=0, logprobs=3,
                                         extra_body={"ignore_eos": True})
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and value <= 0
        assert max(top.values()) == pytest.approx(value, abs=1e-5)  # greedy: the sampled token is the top one
        assert top[token] == pytest.approx(value, abs=1e-5)


def test_chat_logprobs_in_a_stream_cover_every_token(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w5"}], max_tokens=5,
                                            temperature=0, logprobs=True, top_logprobs=2, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    entries = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
               for entry in chunk.choices[0].logprobs.content]
    assert len(entries) == 5 and all(len(entry.top_logprobs) == 2 for entry in entries)
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []


@pytest.mark.parametrize("extra, message", [
    ({"response_format": {"type": "json_object"}}, "response_format.type='json_object'"),
    ({"presence_penalty": 0.5}, "presence_penalty=0.5"),
    ({"n": 2}, "n=2"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
])
def test_options_the_server_cannot_honour_get_400_not_silence(server, extra, message):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "w5"}], **extra}
    response = httpx.post(f"{server}/v1/chat/completions", json=body)
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_sigterm_cuts_a_running_stream_after_the_drain_and_ends_the_server(tmp_path):
    path = tmp_path / "ckpt"
    # a context long enough for a stream that would run ~10 s: longer than the drain allows
    model = convert_to_swiftkv(make_base_model("llama", max_position_embeddings=4096), 3)
    save_checkpoint(model, path, make_tiny_tokenizer())
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "swiftkv.cli", "serve", str(path), "--port", str(port),
                                "--served-model-name", MODEL, "--dtype", "float32", "--kv-cache-memory-gb", "0.01",
                                "--shutdown-timeout", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{base_url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": MODEL, "prompt": "w1", "max_tokens": 4000, "stream": True, "ignore_eos": True}
        lines = []
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=30) as response:
            stream = response.iter_lines()
            lines.append(next(stream))
            process.terminate()
            try:
                lines += stream
            except httpx.HTTPError:  # the server closed the connection when the drain ended
                pass
        # uvicorn drains for --shutdown-timeout, then ends the process by the signal it got, as supervisors
        # expect; the 4000-token stream was cut, not waited out (the timeout only guards against a hang)
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "data: [DONE]" not in lines and len([line for line in lines if line.startswith("data:")]) < 4000
    finally:
        process.kill()
