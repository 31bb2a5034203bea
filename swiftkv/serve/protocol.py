"""OpenAI request bodies (the fields swiftkv honours), validated by pydantic at the boundary."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, Field

from swiftkv.engine.sampling_params import SamplingParams


class SamplingFields(BaseModel):
    model: str
    max_tokens: Optional[int] = Field(default=None, description="defaults to 16 (completions) / 256 (chat)")
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    n: int = 1

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.n != 1:
            raise ValueError("only n=1 is supported")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
                              temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                              stop=stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos)


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[int]]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
