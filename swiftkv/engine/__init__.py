"""Inference engine: paged KV cache, continuous batching, SwiftKV prefill (layers >= l for the last token)."""

from swiftkv.engine.config import EngineConfig
from swiftkv.engine.llm_engine import LLM, LLMEngine, RequestOutput
from swiftkv.engine.sampling_params import SamplingParams

__all__ = ["LLM", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]
