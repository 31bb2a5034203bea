"""OpenAI request bodies, validated by pydantic at the boundary.

Fields swiftkv honours map to `SamplingParams`; OpenAI fields it cannot honour (penalties, logit_bias,
tools, JSON response formats, n > 1) are accepted only at their neutral value and otherwise answered with
a 400 that names them, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from swiftkv.engine.sampling_params import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class SamplingFields(BaseModel):
    model: str
    max_tokens: Optional[int] = Field(default=None, description="defaults to 16 (completions) / 256 (chat)")
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[ResponseFormat] = None
    user: Optional[str] = None

    def unsupported(self) -> list[str]:
        """Fields set to something swiftkv cannot do, as 'name=value' for the error message."""
        problems = []
        if self.n not in (None, 1):
            problems.append(f"n={self.n} (only n=1)")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0):
                problems.append(f"{name}={getattr(self, name)}")
        if self.logit_bias:
            problems.append("logit_bias")
        if self.response_format is not None and self.response_format.type != "text":
            problems.append(f"response_format.type={self.response_format.type!r} (only 'text')")
        return problems

    def requested_logprobs(self) -> Optional[int]:
        return None

    def requested_max_tokens(self) -> Optional[int]:
        """The client's max_tokens, or None when the server picks it."""
        return self.max_tokens

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        max_tokens = self.requested_max_tokens()
        return SamplingParams(max_tokens=default_max_tokens if max_tokens is None else max_tokens,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                              seed=self.seed, stop=stop, stop_token_ids=list(self.stop_token_ids or []),
                              ignore_eos=self.ignore_eos, logprobs=self.requested_logprobs())


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self) -> list[str]:
        problems = super().unsupported()
        if self.echo:
            problems.append("echo=true")
        if self.best_of not in (None, 1):
            problems.append(f"best_of={self.best_of}")
        if self.suffix:
            problems.append("suffix")
        return problems

    def requested_logprobs(self) -> Optional[int]:
        return self.logprobs

    def prompts(self) -> list[Union[str, list[int]]]:
        """One prompt (text or token ids) per choice; a list of them is a batch, as in OpenAI's API."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None

    def template_fields(self) -> dict[str, Any]:
        """The message as chat templates expect it: text content; `developer` is the newer name of `system`."""
        if isinstance(self.content, list):
            kinds = sorted({part.type for part in self.content if part.type != "text"})
            if kinds:
                raise ValueError(f"content parts of type {', '.join(map(repr, kinds))} are not supported "
                                 "(text only)")
            content = "".join(part.text or "" for part in self.content)
        else:
            content = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None

    def unsupported(self) -> list[str]:
        problems = super().unsupported()
        if self.tools:
            problems.append("tools")
        return problems

    def requested_logprobs(self) -> Optional[int]:
        if not self.logprobs:
            if self.top_logprobs:
                raise ValueError("top_logprobs needs logprobs=true")
            return None
        return self.top_logprobs or 0

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
