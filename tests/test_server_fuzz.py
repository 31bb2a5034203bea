"""Fuzzing the HTTP API: generated request bodies (plausible fields, wrong types, extreme numbers, raw bytes)
against a tiny model. No request may get a 5xx, and after every one the engine still serves a normal
completion. 1,000 generated requests per run, with a fixed seed so that CI runs are repeatable."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from swiftkv.convert import convert_to_swiftkv
from swiftkv.serve.app import create_app

from conftest import make_base_model
from test_engine import engine_for
from test_server import MODEL

PROBE = {"model": MODEL, "prompt": "w1 w2", "max_tokens": 2, "temperature": 0, "ignore_eos": True}


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8)
words = st.lists(st.integers(0, 100).map(lambda i: f"w{i}"), min_size=1, max_size=12).map(" ".join)
text = st.one_of(words, words, st.text(max_size=30))
token_ids = st.lists(st.integers(0, 95), min_size=1, max_size=10)
huge_int = st.integers(-2**70, 2**70)
odd_float = st.one_of(st.floats(), st.sampled_from([float("nan"), float("inf"), -1e308, 1e-320]))

# Each field: (values a client may well send, values of the right kind that are invalid or extreme)
SAMPLING = {
    "max_tokens": (st.integers(1, 12), st.one_of(st.integers(-2, 0), huge_int)),
    "temperature": (st.one_of(st.sampled_from([0, 1e-300, 1e-6, 0.7, 2.0, 1e308]), st.floats(0, 5)), odd_float),
    "top_p": (st.floats(1e-6, 1), odd_float),
    "top_k": (st.integers(0, 200), huge_int),
    "seed": (st.integers(-2**63, 2**64 - 1), huge_int),
    "stop": (st.one_of(text, st.lists(text, max_size=3)), st.sampled_from(["", [""], [1]])),
    "stop_token_ids": (st.lists(st.integers(0, 95), max_size=3), st.lists(huge_int, max_size=3)),
    "ignore_eos": (st.booleans(), st.sampled_from([None, "yes", 2])),
    "stream": (st.booleans(), st.sampled_from([None, "true", 3])),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), st.sampled_from([{}, [], "x"])),
    "n": (st.just(1), st.integers(-1, 5)),
    "presence_penalty": (st.just(0), odd_float),
    "response_format": (st.just({"type": "text"}), st.sampled_from([{"type": "json_object"}, {"x": 1}, "text"])),
}
part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
odd_part = st.fixed_dictionaries({"type": st.sampled_from(["image_url", "x", ""])}, optional={"text": text})
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                 "content": st.one_of(text, st.none(), st.lists(part, max_size=3))})
odd_message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["tool", "robot", "", None]),
                                                  "content": st.one_of(st.lists(odd_part, max_size=3), any_json)})
COMPLETION_FIELDS = {
    **SAMPLING,
    "prompt": (st.one_of(text, token_ids, st.lists(text, min_size=1, max_size=3),
                         st.lists(token_ids, min_size=1, max_size=3)),
               st.one_of(st.lists(huge_int, max_size=4), st.just([]), st.just([[]]), st.text(max_size=3))),
    "logprobs": (st.integers(0, 20), st.one_of(st.integers(-3, -1), st.integers(21, 100))),
    "echo": (st.just(False), st.just(True)),
}
CHAT_FIELDS = {
    **SAMPLING,
    "messages": (st.lists(message, min_size=1, max_size=4), st.one_of(st.just([]), st.lists(odd_message, max_size=3))),
    "logprobs": (st.booleans(), st.sampled_from([None, 5, "x"])),
    "top_logprobs": (st.integers(0, 20), st.integers(-3, 100)),
    "max_completion_tokens": (st.integers(1, 12), huge_int),
}


@st.composite
def request_bodies(draw, fields: dict, required: str) -> dict:
    """A body a client may send (the model and `required` present, any others drawn from valid values), then
    up to three fields changed to invalid or extreme values of their kind, or to any JSON, or dropped."""
    body = {"model": MODEL, required: draw(fields[required][0])}
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=6, unique=True)):
        body[name] = draw(fields[name][0])
    for name in draw(st.lists(st.sampled_from(sorted(fields) + ["model"]), max_size=3, unique=True)):
        kind = draw(st.sampled_from(["edge", "any", "drop"]))
        if kind == "drop":
            body.pop(name, None)
        elif kind == "any" or name == "model":
            body[name] = draw(any_json)
        else:
            body[name] = draw(fields[name][1])
    return body


completion_bodies = request_bodies(COMPLETION_FIELDS, "prompt")
chat_bodies = request_bodies(CHAT_FIELDS, "messages")


@pytest.fixture(scope="module")
def client():
    # a short context keeps requests that leave max_tokens to its default (the room left) quick
    model = convert_to_swiftkv(make_base_model("llama", max_position_embeddings=96), 2)
    with TestClient(create_app(engine_for(model), MODEL)) as client:
        yield client


def send_and_check(client: TestClient, path: str, content: bytes) -> None:
    with client.stream("POST", path, content=content, headers={"content-type": "application/json"}) as response:
        body = b"".join(response.iter_bytes())
    assert response.status_code < 500, body
    if response.status_code == 200 and body.startswith(b"data:"):
        for line in body.decode().splitlines():
            if line.startswith("data: {"):
                assert json.loads(line[6:]).get("error", {}).get("code", 0) < 500, line
    probe = client.post("/v1/completions", json=PROBE)
    assert probe.status_code == 200 and probe.json()["usage"]["completion_tokens"] == 2


@fuzz(400)
@given(body=completion_bodies)
def test_fuzzed_completions_never_get_a_5xx_nor_stop_the_engine(client, body):
    send_and_check(client, "/v1/completions", json.dumps(body).encode())


@fuzz(400)
@given(body=chat_bodies)
def test_fuzzed_chat_completions_never_get_a_5xx_nor_stop_the_engine(client, body):
    send_and_check(client, "/v1/chat/completions", json.dumps(body).encode())


@fuzz(200)
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                         any_json.map(lambda value: json.dumps(value).encode())))
def test_fuzzed_raw_bodies_never_get_a_5xx_nor_stop_the_engine(client, content):
    send_and_check(client, "/v1/completions", content)
