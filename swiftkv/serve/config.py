"""Server limits and access settings (the `swiftkv serve` flags of the same names)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

API_KEY_ENVIRONMENT = "SWIFTKV_API_KEY"
# A prompt longer than this many characters per token of context cannot fit, whatever it tokenizes to,
# for any tokenizer we know (English text averages ~4 characters per token, code and whitespace runs more).
CHARACTERS_PER_TOKEN_BOUND = 16


@dataclass
class ServerConfig:
    api_key: Optional[str] = None             # required as "Authorization: Bearer KEY" on every /v1 route
    max_request_bytes: int = 4 * 2**20        # larger bodies get 413 before they are parsed
    max_prompt_chars: Optional[int] = None    # None: CHARACTERS_PER_TOKEN_BOUND x the longest prompt that fits
    max_queued_requests: int = 64             # accepted requests not yet generating; beyond: 429 + Retry-After
    request_timeout_s: Optional[float] = None  # a request still running after this is aborted
    shutdown_timeout_s: float = 5.0           # on SIGTERM, in-flight requests get this long to finish
    heap_trim_interval_s: float = 5.0         # return freed heap pages to the OS this often (serve/memory.py); 0: off

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENVIRONMENT) or None
        for name in ("max_request_bytes", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be >= 1, got {self.max_prompt_chars}")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        for name in ("shutdown_timeout_s", "heap_trim_interval_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def prompt_chars_limit(self, max_prompt_tokens: int) -> int:
        return self.max_prompt_chars or CHARACTERS_PER_TOKEN_BOUND * max_prompt_tokens
