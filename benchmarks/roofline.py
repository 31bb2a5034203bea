"""What this machine can do at best: the hardware floor under the engine's TTFT and decode numbers.

Measures, on the model's own shapes and threads:
  * bf16 matmul throughput at prefill shapes (every linear of a decoder layer on `--prompt-tokens` rows);
  * causal attention time per layer (`scaled_dot_product_attention`, the model's heads, GQA) at that length;
  * memory bandwidth: a streaming reduction over 1 GiB, and matrix-vector products over the model's real
    weights (what one decode token does), with oneDNN on and off;
and turns them into floors: prefill >= layers run x (matmul + attention) time, decode >= weight bytes / the
best streaming bandwidth. The engine's measured numbers (benchmarks/results/engine.json) are set beside them.
Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from swiftkv.loading import DEFAULT_MODEL, load_model
from swiftkv.plotting import png_figure


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_linears(model) -> list[torch.Tensor]:
    return [m.weight for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)]


def decode_weights(model) -> list[torch.Tensor]:
    """Every weight matrix one decode token reads (all layers' linears and the output head)."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--swiftkv-layers", type=int, default=15, help="l: layers prompt tokens run in SwiftKV")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--engine-results", default="benchmarks/results/engine.json")
    parser.add_argument("--out", default="benchmarks/results/roofline")
    args = parser.parse_args()

    model = load_model(args.model, dtype="bfloat16")
    config = model.config
    dtype, tokens = torch.bfloat16, args.prompt_tokens

    # Prefill: one layer's linears on every prompt row (input width differs for down_proj).
    weights = layer_linears(model)
    inputs = {w.shape[1]: torch.randn(tokens, w.shape[1], dtype=dtype) for w in weights}
    layer_matmul_s = timed(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], args.repeats)
    layer_flops = 2 * tokens * sum(w.numel() for w in weights)
    head_dim = config.hidden_size // config.num_attention_heads
    query = torch.randn(1, config.num_attention_heads, tokens, head_dim, dtype=dtype)
    key = torch.randn(1, config.num_key_value_heads, tokens, head_dim, dtype=dtype)
    layer_attention_s = timed(
        lambda: F.scaled_dot_product_attention(query, key, key, is_causal=True, enable_gqa=True), args.repeats)
    del inputs

    # Decode: stream bandwidth, then the real weights through matrix-vector products.
    big = torch.ones(2**29, dtype=dtype)  # 1 GiB
    stream_gbps = big.numel() * big.element_size() / timed(big.sum, args.repeats) / 1e9
    del big
    matrices = decode_weights(model)
    weight_bytes = sum(w.numel() * w.element_size() for w in matrices)
    vectors = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype) for w in matrices}
    gemv = {}
    for name, enabled in (("onednn", True), ("aten", False)):
        with torch.backends.mkldnn.flags(enabled=enabled):
            seconds = timed(lambda: [F.linear(vectors[w.shape[1]], w) for w in matrices], args.repeats)
        gemv[name] = {"seconds_per_token": seconds, "gb_per_s": weight_bytes / seconds / 1e9}

    layers, l = config.num_hidden_layers, args.swiftkv_layers
    per_layer = layer_matmul_s + layer_attention_s
    floors = {
        "base_ttft_s": layers * per_layer,
        "swiftkv_ttft_s": l * per_layer,  # layers >= l run one token: negligible at this length
        "decode_ms_per_token": 1000 * weight_bytes / (max(stream_gbps, *(g["gb_per_s"] for g in gemv.values())) * 1e9),
    }
    result = {
        "model": args.model, "threads": torch.get_num_threads(), "prompt_tokens": tokens,
        "num_hidden_layers": layers, "swiftkv_layers": l,
        "matmul_gflops": layer_flops / layer_matmul_s / 1e9,
        "layer_matmul_s": layer_matmul_s, "layer_attention_s": layer_attention_s,
        "stream_gb_per_s": stream_gbps, "decode_weight_bytes": weight_bytes, "gemv": gemv,
        "floors": floors,
        "targets": {"base_ttft_s": 0.9, "swiftkv_ttft_s": 0.45, "decode_ms_per_token": 5.0},
    }
    engine_path = Path(args.engine_results)
    if engine_path.exists():
        systems = json.loads(engine_path.read_text())["systems"]
        result["engine_measured"] = {
            "base_ttft_s": systems["engine-base"]["ttft_s"][str(tokens)],
            "swiftkv_ttft_s": systems["swiftkv-g1"]["ttft_s"][str(tokens)],
            "decode_ms_per_token": systems["swiftkv-g1"]["decode_1"]["ms_per_token_per_stream"],
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result, indent=1))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def plot(result: dict, path: Path) -> None:
    metrics = list(result["floors"])
    series = {"hardware floor": result["floors"], "target": result["targets"]}
    if "engine_measured" in result:
        series["engine (measured)"] = result["engine_measured"]
    with png_figure(path, 1, len(metrics), figsize=(4 * len(metrics), 4)) as (fig, axes):
        for ax, metric in zip(axes, metrics):
            values = [row[metric] for row in series.values()]
            ax.bar(range(len(values)), values, color=["tab:gray", "tab:red", "tab:blue"][:len(values)])
            ax.set_xticks(range(len(values)), list(series), rotation=15)
            ax.set_title(metric)
        fig.suptitle(f"{result['model']} bf16, {result['threads']} CPU threads: matmul {result['matmul_gflops']:.0f} "
                     f"GFLOP/s, stream {result['stream_gb_per_s']:.1f} GB/s, {result['prompt_tokens']}-token prompt")


if __name__ == "__main__":
    main()
