"""OpenAI-compatible HTTP API over the engine: /v1/completions, /v1/chat/completions (SSE streaming),
/v1/models, /health, /metrics. Errors come back as OpenAI error objects with a 4xx status."""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from swiftkv.engine.llm_engine import LLMEngine
from swiftkv.serve.async_engine import AsyncEngine
from swiftkv.serve.metrics import ServerMetrics
from swiftkv.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(status: int, message: str, kind: str = "invalid_request_error", param=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def create_app(engine: LLMEngine, model_name: str) -> FastAPI:
    app = FastAPI(title="swiftkv", version="0.1.0")
    metrics = ServerMetrics(engine)
    runtime = AsyncEngine(engine, on_event=metrics.observe)
    app.state.runtime, app.state.metrics = runtime, metrics
    app.router.on_shutdown.append(runtime.shutdown)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, error: RequestValidationError):
        details = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in error.errors())
        return error_response(400, f"invalid request: {details}")

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return error_response(error.status, error.message, error.kind, error.param)

    def check(body: SamplingFields, default_max_tokens: int):
        if body.model != model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                           "not_found_error", "model")
        try:
            return body.sampling_params(default_max_tokens)
        except ValueError as error:
            raise APIError(400, str(error)) from error

    async def start(prompt, params):
        try:
            return await runtime.submit(prompt, params)
        except ValueError as error:
            raise APIError(400, str(error)) from error

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "swiftkv",
                                            "max_model_len": engine.max_model_length}]}

    async def respond(request: Request, prompt, params, chat: bool, stream: bool):
        sequence, events = await start(prompt, params)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str, finish_reason, delta: bool):
            if not chat:
                return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
            body = {"role": "assistant", "content": text}
            return {"index": 0, ("delta" if delta else "message"): body, "finish_reason": finish_reason}

        def usage():
            generated = len(sequence.output_token_ids)
            return {"prompt_tokens": sequence.num_prompt_tokens, "completion_tokens": generated,
                    "total_tokens": sequence.num_prompt_tokens + generated}

        if not stream:
            try:
                while await events.get() is not None:
                    pass
            finally:
                if not sequence.is_finished:
                    runtime.abort(sequence)
            return {"id": request_id, "object": kind, "created": created, "model": model_name,
                    "choices": [choice(sequence.text, sequence.finish_reason, False)], "usage": usage()}

        async def sse() -> AsyncIterator[str]:
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            try:
                while (event := await events.get()) is not None:
                    if event.text_delta or event.finished:
                        finish = sequence.finish_reason if event.finished else None
                        payload = {"id": request_id, "object": chunk_kind, "created": created, "model": model_name,
                                   "choices": [choice(event.text_delta, finish, True)]}
                        yield f"data: {json.dumps(payload)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we finished): free its KV blocks
                if not sequence.is_finished:
                    runtime.abort(sequence)

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        params = check(body, default_max_tokens=16)
        return await respond(request, body.prompt, params, chat=False, stream=body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        params = check(body, default_max_tokens=256)
        messages = [m.model_dump() for m in body.messages]
        try:
            prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as error:  # a template that rejects these messages (roles, order)
            raise APIError(400, f"messages do not fit the model's chat template: {error}") from error
        return await respond(request, list(prompt), params, chat=True, stream=body.stream)

    return app
