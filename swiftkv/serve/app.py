"""OpenAI-compatible HTTP API over the engine: /v1/completions, /v1/chat/completions (SSE streaming),
/v1/models, /health, /metrics. Errors come back as OpenAI error objects.

Where work happens: tokenization and chat templating run in a worker thread (never on the event loop,
never on the engine thread); the engine thread only runs the model. What bounds a request: the body size
(413), the prompt's characters before tokenizing (400), the queue of requests not yet generating (429 with
Retry-After), an optional timeout (504), and its client: one that goes away, streaming or not, is aborted
and its KV blocks freed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
import uuid
from contextlib import contextmanager
from typing import AsyncIterator, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from swiftkv.engine.llm_engine import LLMEngine, TokenEvent
from swiftkv.engine.sampling_params import SamplingParams
from swiftkv.engine.sequence import Sequence
from swiftkv.serve.async_engine import ENGINE_DIED, AsyncEngine, EngineDeadError
from swiftkv.serve.config import ServerConfig
from swiftkv.serve.metrics import ServerMetrics
from swiftkv.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def error_body(status: int, message: str, kind: str = "invalid_request_error", param=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, kind: str = "invalid_request_error", param=None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind, param), status, headers=headers)


class BodySizeLimit:
    """ASGI middleware: a body over `max_bytes` (declared or streamed) gets 413 before anything parses it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(413, f"request body exceeds {self.max_bytes} bytes", "invalid_request_error")
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)


class Admission:
    """Requests accepted but not yet generating: those being tokenized and submitted, counted here, and those
    the scheduler holds waiting for prefill. Beyond `limit` new ones get 429 at once instead of queueing for
    minutes (vLLM and TGI answer overload the same way)."""

    def __init__(self, limit: int, engine: LLMEngine, metrics: ServerMetrics):
        self.limit, self.engine, self.metrics = limit, engine, metrics
        self.submitting = 0

    @contextmanager
    def admit(self, count: int):
        if self.submitting + len(self.engine.scheduler.waiting) + count > self.limit:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"the server is at its limit of {self.limit} queued requests; retry later",
                           "rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.submitting += count
        try:
            yield
        finally:
            self.submitting -= count


def create_app(engine: LLMEngine, model_name: str, config: Optional[ServerConfig] = None) -> FastAPI:
    config = config or ServerConfig()
    app = FastAPI(title="swiftkv", version="0.1.0")
    metrics = ServerMetrics(engine)
    runtime = AsyncEngine(engine, on_event=metrics.observe)
    admission = Admission(config.max_queued_requests, engine, metrics)
    max_prompt_chars = config.prompt_chars_limit(min(engine.max_model_length, engine.capacity_tokens))
    app.state.runtime, app.state.metrics, app.state.config = runtime, metrics, config
    app.router.on_shutdown.append(runtime.shutdown)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_request_bytes)

    def require_api_key(request: Request) -> None:
        if config.api_key:
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(key.encode(), config.api_key.encode()):
                raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                               "authentication_error")

    authorized = [Depends(require_api_key)]

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, error: RequestValidationError):
        details = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in error.errors())
        return error_response(400, f"invalid request: {details}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(error.status_code, str(error.detail), kind, headers=getattr(error, "headers", None))

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return error_response(error.status, error.message, error.kind, error.param, error.headers)

    def check(body: SamplingFields, default_max_tokens: int):
        if body.model != model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                           "not_found_error", "model")
        unsupported = body.unsupported()
        if unsupported:
            raise APIError(400, f"not supported by this server: {', '.join(unsupported)}")
        try:
            return body.sampling_params(default_max_tokens)
        except ValueError as error:
            raise APIError(400, str(error)) from error

    def check_length(characters: int) -> None:
        if characters > max_prompt_chars:
            raise APIError(400, f"the prompt has {characters} characters; this server accepts at most "
                                f"{max_prompt_chars} (--max-prompt-chars)", param="prompt")

    async def tokenized(tokenize) -> list[list[int]]:
        """Run `tokenize` (text or templates -> token ids) in a worker thread; ValueError -> 400."""
        try:
            return await run_in_threadpool(tokenize)
        except ValueError as error:
            raise APIError(400, str(error)) from error

    @app.get("/health")
    async def health():
        if not runtime.alive:
            reason = repr(runtime.failure) if runtime.failure is not None else "the engine is shut down"
            return JSONResponse({"status": "error", "error": reason}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "swiftkv",
                                            "max_model_len": engine.max_model_length}]}

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest, request: Request):
        params = check(body, default_max_tokens=16)
        prompts = body.prompts()
        if not prompts:
            raise APIError(400, "prompt is an empty list", param="prompt")
        check_length(sum(len(p) for p in prompts if isinstance(p, str)))
        with admission.admit(len(prompts)):
            token_ids = await tokenized(lambda: [engine.tokenize(p) if isinstance(p, str)
                                                 else engine.check_token_ids(p) for p in prompts])
            sequences, events = await submit(token_ids, params, fit_max_tokens=body.requested_max_tokens() is None)
        return await respond(request, body, sequences, events, chat=False)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        params = check(body, default_max_tokens=256)
        try:
            messages = [m.template_fields() for m in body.messages]
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from error
        check_length(sum(len(m["content"]) for m in messages))

        def apply_template() -> list[list[int]]:
            try:
                prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            except Exception as error:  # a template that rejects these messages (roles, order)
                raise ValueError(f"messages do not fit the model's chat template: {error}") from error
            return [engine.check_token_ids(prompt)]

        with admission.admit(1):
            sequences, events = await submit(await tokenized(apply_template), params,
                                             fit_max_tokens=body.requested_max_tokens() is None)
        return await respond(request, body, sequences, events, chat=True)

    async def submit(prompts: list[list[int]], params: SamplingParams,
                     fit_max_tokens: bool) -> tuple[list[Sequence], asyncio.Queue]:
        """Hand every prompt of a request to the engine; their events arrive on one queue. A default
        max_tokens (`fit_max_tokens`) shrinks to the room the context leaves, as OpenAI's does."""
        events: asyncio.Queue = asyncio.Queue()
        sequences: list[Sequence] = []
        room = min(engine.max_model_length, engine.capacity_tokens)
        try:
            for prompt in prompts:
                if fit_max_tokens and len(prompt) < room:
                    prompt_params = dataclasses.replace(params, max_tokens=min(params.max_tokens, room - len(prompt)))
                else:
                    prompt_params = params
                sequences.append(await runtime.submit(prompt, prompt_params, events))
        except ValueError as error:
            abort_all(sequences)
            raise APIError(400, str(error)) from error
        except EngineDeadError as error:
            abort_all(sequences)
            raise APIError(503, str(error), "server_error") from error
        return sequences, events

    async def respond(request: Request, body: SamplingFields, sequences: list[Sequence], events: asyncio.Queue,
                      chat: bool):
        deadline = time.monotonic() + config.request_timeout_s if config.request_timeout_s else None
        reply = Reply(engine, model_name, sequences, chat, include_usage=bool(
            body.stream_options and body.stream_options.include_usage))
        if body.stream:
            return StreamingResponse(stream(events, reply, deadline), media_type="text/event-stream")
        collected = asyncio.ensure_future(collect(events, reply))
        gone = asyncio.ensure_future(client_gone(request))
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait({collected, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if collected.done():
                collected.result()  # raises EngineDeadError
                failed = [s for s in sequences if s.finish_reason == "error"]
                if failed:
                    raise APIError(500, f"the request failed in the engine: {failed[0].error}", "server_error")
                return reply.whole()
            if gone.done():
                return Response(status_code=499)  # nobody reads it
            raise APIError(504, f"the request did not finish within {config.request_timeout_s} s", "timeout")
        except EngineDeadError as error:
            raise APIError(503, str(error), "server_error") from error
        finally:
            collected.cancel()
            gone.cancel()
            abort_all(sequences)

    def abort_all(sequences: list[Sequence]) -> None:
        for sequence in sequences:
            if not sequence.is_finished:
                runtime.abort(sequence)

    async def collect(events: asyncio.Queue, reply: "Reply") -> None:
        while not reply.done:
            event = await events.get()
            if event is ENGINE_DIED:
                raise EngineDeadError("the engine stopped while this request was running")
            reply.add(event)

    async def stream(events: asyncio.Queue, reply: "Reply", deadline) -> AsyncIterator[str]:
        try:
            while not reply.done:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    event = await asyncio.wait_for(events.get(), timeout)
                except asyncio.TimeoutError:
                    yield sse(error_body(504, f"the request did not finish within {config.request_timeout_s} s",
                                         "timeout"))
                    break
                if event is ENGINE_DIED:
                    yield sse(error_body(503, "the engine stopped while this request was running", "server_error"))
                    break
                reply.add(event)
                chunk = reply.chunk(event)
                if chunk is not None:
                    yield sse(chunk)
                if event.sequence.finish_reason == "error":
                    yield sse(error_body(500, f"the request failed in the engine: {event.sequence.error}",
                                         "server_error"))
                    break
            else:
                if reply.include_usage:
                    yield sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or the request ended: free the KV blocks of anything still running
            abort_all(reply.sequences)

    return app


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Reply:
    """The OpenAI response of one request with one choice per prompt, built from the engine's events."""

    def __init__(self, engine: LLMEngine, model_name: str, sequences: list[Sequence], chat: bool, include_usage: bool):
        self.tokenizer, self.model_name, self.sequences, self.chat = engine.tokenizer, model_name, sequences, chat
        self.include_usage = include_usage
        self.index = {s.request_id: i for i, s in enumerate(sequences)}
        self.logprobs_sent = [0] * len(sequences)
        self.finished = 0
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    @property
    def done(self) -> bool:
        return self.finished == len(self.sequences)

    def add(self, event: TokenEvent) -> None:
        self.finished += event.finished

    def chunk(self, event: TokenEvent) -> Optional[dict]:
        """The stream chunk an event makes, if any: its text and the log-probabilities not sent yet."""
        sequence = event.sequence
        if not (event.text_delta or event.finished) or sequence.finish_reason == "error":
            return None
        index = self.index[sequence.request_id]
        entries = sequence.logprobs[self.logprobs_sent[index]:]
        self.logprobs_sent[index] = len(sequence.logprobs)
        choice = self._choice(index, event.text_delta, sequence.finish_reason if event.finished else None,
                              entries, delta=True)
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name, "choices": [choice]}

    def whole(self) -> dict:
        choices = [self._choice(i, s.text, s.finish_reason, s.logprobs, delta=False)
                   for i, s in enumerate(self.sequences)]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name, "choices": choices, "usage": self.usage()}

    def usage(self) -> dict:
        prompt = sum(s.num_prompt_tokens for s in self.sequences)
        completion = sum(len(s.output_token_ids) for s in self.sequences)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name, "choices": [], "usage": self.usage()}

    def _choice(self, index: int, text: str, finish_reason, entries: list, delta: bool) -> dict:
        sequence = self.sequences[index]
        logprobs = self._logprobs(entries, sequence) if sequence.params.logprobs is not None else None
        if not self.chat:
            return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
        message = {"role": "assistant", "content": text}
        return {"index": index, ("delta" if delta else "message"): message, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def _logprobs(self, entries: list, sequence: Sequence) -> dict:
        """OpenAI's logprobs object for `entries`, the last ones of `sequence.logprobs`: chat's `content`
        list, or the completions API's parallel lists."""
        first = len(sequence.logprobs) - len(entries)
        tokens = sequence.output_token_ids[first:first + len(entries)]
        text = [self.tokenizer.decode([token]) for token in tokens]
        top = [[(self.tokenizer.decode([t]), value) for t, value in entry.top] for entry in entries]
        if self.chat:
            return {"content": [{"token": t, "logprob": e.logprob, "bytes": list(t.encode()),
                                 "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode())}
                                                  for s, v in alternatives]}
                                for t, e, alternatives in zip(text, entries, top)]}
        return {"tokens": text, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [dict(alternatives) for alternatives in top]}
