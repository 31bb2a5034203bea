"""`swiftkv` command line: a thin layer over the library functions."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from swiftkv.distill.config import DistillConfig
from swiftkv.engine.config import EngineConfig
from swiftkv.engine.model_runner import KV_CACHE_DTYPES
from swiftkv.eval import DEFAULT_TASKS, SAME_CHECKPOINT
from swiftkv.loading import DEFAULT_MODEL
from swiftkv.engine.quantized import WEIGHT_FORMATS
from swiftkv.serve.config import API_KEY_ENVIRONMENT, ServerConfig


def _convert(args: argparse.Namespace) -> None:
    from swiftkv.convert import convert_checkpoint

    out = convert_checkpoint(args.model, args.out, args.num_key_value_layers, args.key_value_group_size,
                             dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"wrote SwiftKV checkpoint to {out}")


def _add_distill_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `DistillConfig` field (same names), plus `--config FILE` holding any of them."""
    parser.add_argument("--config", help="YAML/JSON file with DistillConfig fields; flags override it")
    for field in dataclasses.fields(DistillConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None,
                            help=f"default: {field.default}")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")


def _distill_config(args: argparse.Namespace) -> DistillConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)
                 if getattr(args, f.name) is not None}
    return DistillConfig.from_file(args.config, **overrides) if args.config else DistillConfig(**overrides)


def _export(args: argparse.Namespace) -> None:
    from swiftkv.export import export_for_vllm

    out = export_for_vllm(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"wrote a vLLM + ArcticInference checkpoint to {out}: vllm serve {out}")


def _distill(args: argparse.Namespace) -> None:
    from swiftkv.distill import distill

    final, state = distill(args.model, args.out, data=args.data, teacher=args.teacher, config=_distill_config(args),
                           resume=args.resume)
    print(f"wrote distilled SwiftKV checkpoint to {final} after {state.step} steps")


def _build(args: argparse.Namespace) -> None:
    from swiftkv.build import run_build

    if args.max_quality_drop is not None:
        return _search(args)
    eval_limit = {} if args.eval_limit is None else {"eval_limit": args.eval_limit}  # None: run_build's default
    run_build(args.model, args.out, args.num_key_value_layers, args.key_value_group_size, _distill_config(args),
              resume=args.resume, **eval_limit)


def _search(args: argparse.Namespace) -> int:
    from swiftkv.loading import load_config
    from swiftkv.search import SearchConfig, default_depths, run_search

    depths = getattr(args, "depths", None) or default_depths(load_config(args.model).num_hidden_layers)
    flags = ("group_sizes", "tasks", "ttft_tokens", "serving_requests", "speed_rounds")
    search_flags = {name: getattr(args, name) for name in flags
                    if getattr(args, name, None) is not None}  # unset (and `build --max-quality-drop`): defaults
    if args.eval_limit is not None:
        search_flags["eval_limit"] = args.eval_limit or None  # 0: every example
    config = SearchConfig(depths=depths, max_quality_drop=args.max_quality_drop, **search_flags)
    result = run_search(args.model, args.out, config, _distill_config(args))
    return 0 if result["chosen"] else 1  # no point within the budget: a script can tell


def _eval(args: argparse.Namespace) -> None:
    from swiftkv.eval import evaluate

    baseline = None if args.baseline == "none" else args.baseline
    evaluate(args.model, args.tasks, baseline, args.limit, args.batch_size, args.dtype, args.max_new_tokens, args.out,
             device=args.device)


ENGINE_FLAGS = ("dtype", "device", "kv_cache_memory_gb", "block_size", "max_num_seqs", "max_prefill_tokens",
                "kv_cache_dtype", "weights", "cuda_graphs", "compile_decode")


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{name: getattr(args, name) for name in ENGINE_FLAGS})


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `EngineConfig` field a user tunes, its default read from `EngineConfig`."""
    defaults = EngineConfig()
    parser.add_argument("--dtype", default=defaults.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    _add_device_flag(parser, defaults.device)
    parser.add_argument("--kv-cache-memory-gb", type=float, default=defaults.kv_cache_memory_gb,
                        help="KV cache budget (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs, help="sequences decoding at once")
    parser.add_argument("--max-prefill-tokens", type=int, default=defaults.max_prefill_tokens,
                        help="prompt tokens per step (default: 1024 on a CPU, 8192 on a GPU)")
    parser.add_argument("--kv-cache-dtype", default=defaults.kv_cache_dtype, choices=KV_CACHE_DTYPES,
                        help="int8 or fp8 (e4m3): 8-bit K/V with per-token scales (about 2x the tokens in the "
                             "same memory)")
    parser.add_argument("--weights", default=defaults.weights, choices=WEIGHT_FORMATS,
                        help="int8 / int4: weight-only quantized projections and lm_head, for faster decode "
                             "on CPU (auto: as loaded in --dtype)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=defaults.cuda_graphs,
                        help="on a GPU, launch every decode step's kernels one by one instead of replaying "
                             "CUDA graphs (slower; for debugging)")
    parser.add_argument("--compile-decode", action="store_true", default=defaults.compile_decode,
                        help="on a CPU, torch.compile decode steps, one stream and batches (faster tokens "
                             "for SmolLM2 on 2 cores; compiles for 20-60 s at start)")


def _add_device_flag(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default, help="auto (CUDA when present), cpu, cuda or cuda:N "
                                                          "(default: %(default)s)")


def _serve(args: argparse.Namespace) -> int:
    from swiftkv.engine import LLMEngine
    from swiftkv.serve.server import make_server, run_server

    config = ServerConfig(api_key=args.api_key, max_request_bytes=args.max_request_bytes,
                          max_prompt_chars=args.max_prompt_chars, max_queued_requests=args.max_queued_requests,
                          request_timeout_s=args.request_timeout, shutdown_timeout_s=args.shutdown_timeout,
                          heap_trim_interval_s=args.heap_trim_interval)
    engine = LLMEngine.from_pretrained(args.model, _engine_config(args))
    print(f"KV cache: {engine.capacity_tokens} tokens in {args.kv_cache_memory_gb} GB "
          f"({engine.runner.num_kv_entries} KV entries per token)")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who reaches it can use it "
              f"(--api-key or {API_KEY_ENVIRONMENT})", file=sys.stderr)
    return run_server(make_server(engine, args.served_model_name or args.model, args.host, args.port, config))


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 routes (or set "
                                          f"{API_KEY_ENVIRONMENT})")
    parser.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes,
                        help="larger request bodies get 413 (default: %(default)s)")
    parser.add_argument("--max-prompt-chars", type=int,
                        help="longer prompts get 400 before tokenizing (default: 16 per token of context)")
    parser.add_argument("--max-queued-requests", type=int, default=defaults.max_queued_requests,
                        help="requests waiting to start beyond this get 429 + Retry-After (default: %(default)s)")
    parser.add_argument("--request-timeout", type=float, help="abort a request after this many seconds (504)")
    parser.add_argument("--shutdown-timeout", type=float, default=defaults.shutdown_timeout_s,
                        help="seconds in-flight requests get to finish on SIGTERM (default: %(default)s)")
    parser.add_argument("--heap-trim-interval", type=float, default=defaults.heap_trim_interval_s,
                        help="seconds between returning freed heap memory to the OS; 0 turns it off "
                             "(default: %(default)s)")


def _generate(args: argparse.Namespace) -> None:
    from swiftkv.engine import LLM, SamplingParams

    llm = LLM(args.model, **vars(_engine_config(args)))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    prompts = args.prompt
    if args.chat:
        tokenizer = llm.engine.tokenizer
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=True) for p in prompts]
    for output in llm.generate(list(prompts), params):
        print(output.text)
        print(f"-- {len(output.token_ids)} tokens, TTFT {output.ttft_s * 1000:.0f} ms, {output.finish_reason}")


def _chat(args: argparse.Namespace) -> None:
    from swiftkv.engine import LLM, SamplingParams

    llm = LLM(args.model, **vars(_engine_config(args)))
    tokenizer, messages = llm.engine.tokenizer, []
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print("chat with the model; an empty line or Ctrl-D ends")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        reply = ""
        for delta in llm.stream(list(prompt), params):
            print(delta, end="", flush=True)
            reply += delta
        print()
        messages.append({"role": "assistant", "content": reply})


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)


def _add_layout_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-key-value-layers", default="0.5",
                        help="layers that keep their own KV: a count (16) or a fraction of all layers (0.5)")
    parser.add_argument("--key-value-group-size", type=int, default=1,
                        help="AcrossKV: SwiftKV layers sharing one KV cache entry (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swiftkv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert a base model into a SwiftKV checkpoint")
    convert.add_argument("--model", default=DEFAULT_MODEL,
                         help="built-in alias, local HF directory, .gguf file or hub id (default: %(default)s)")
    _add_layout_flags(convert)
    convert.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    convert.add_argument("--max-shard-size", default="2GB")
    convert.add_argument("--out", required=True, help="output directory")
    convert.set_defaults(run=_convert)

    export = commands.add_parser("export",
                                 help="write a SwiftKV checkpoint for another engine (vLLM + ArcticInference)")
    export.add_argument("checkpoint", help="SwiftKV checkpoint folder (from `swiftkv convert` or `distill`)")
    export.add_argument("out", help="output folder")
    export.add_argument("--for", dest="target", choices=["vllm"], default="vllm",
                        help="target engine: vllm (with Snowflake's ArcticInference plugin)")
    export.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    export.add_argument("--max-shard-size", default="5GB")
    export.set_defaults(run=_export)

    distill = commands.add_parser("distill", help="distill a SwiftKV checkpoint from its base model")
    distill.add_argument("--model", required=True, help="SwiftKV checkpoint (from `swiftkv convert`)")
    distill.add_argument("--teacher", help="separate base model (default: the checkpoint with swiftkv off)")
    distill.add_argument("--data", nargs="+", default=["default"],
                         help="'default' (teacher-generated corpus), .jsonl/.json/.parquet/.txt files, "
                              "or hf:<dataset>[:split]")
    distill.add_argument("--out", required=True, help="run directory (checkpoints/, history.json, model/)")
    _add_distill_config_flags(distill)
    distill.set_defaults(run=_distill)

    evaluation = commands.add_parser("eval", help="quality of a model side by side with its baseline")
    evaluation.add_argument("--model", required=True, help="model to evaluate (SwiftKV checkpoint or any model)")
    evaluation.add_argument("--baseline", default=SAME_CHECKPOINT,
                            help=f"'{SAME_CHECKPOINT}' (same checkpoint, SwiftKV off; default), a model, or 'none'")
    evaluation.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS,
                            help="built-in task names or task files (.jsonl / .txt); default: %(default)s")
    evaluation.add_argument("--limit", type=int, help="examples (windows for perplexity) per task")
    evaluation.add_argument("--batch-size", type=int, default=16)
    evaluation.add_argument("--dtype", default="bfloat16", choices=["auto", "float32", "bfloat16", "float16"])
    evaluation.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens for fidelity tasks")
    _add_device_flag(evaluation)
    evaluation.add_argument("--out", help="folder for eval.json and eval.md")
    evaluation.set_defaults(run=_eval)

    serve = commands.add_parser("serve", help="OpenAI-compatible server (/v1/completions, /v1/chat/completions)")
    serve.add_argument("model", help="checkpoint (SwiftKV or base), alias or GGUF")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", help="model id clients send (default: the model argument)")
    _add_engine_flags(serve)
    _add_server_flags(serve)
    serve.set_defaults(run=_serve)

    generate = commands.add_parser("generate", help="generate completions with the engine")
    generate.add_argument("model")
    generate.add_argument("prompt", nargs="+")
    generate.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    _add_engine_flags(generate)
    _add_sampling_flags(generate)
    generate.set_defaults(run=_generate)

    chat = commands.add_parser("chat", help="interactive chat in the terminal, streamed")
    chat.add_argument("model")
    _add_engine_flags(chat)
    _add_sampling_flags(chat)
    chat.set_defaults(run=_chat)

    build = commands.add_parser("build", help="main job: convert + teacher corpus + distill + report")
    build.add_argument("--model", default=DEFAULT_MODEL, help="base model (default: %(default)s)")
    build.add_argument("--out", default="runs/smollm2-swiftkv", help="run directory (default: %(default)s)")
    _add_layout_flags(build)
    _add_distill_config_flags(build)
    build.add_argument("--eval-limit", type=int,
                       help="examples per task in the final side-by-side evaluation (0 skips it; default: 80, "
                            "with --max-quality-drop 500)")
    build.add_argument("--max-quality-drop", type=float, metavar="POINTS",
                       help="choose l instead of --num-key-value-layers: run `swiftkv search` over the default "
                            "depths and keep the fastest within POINTS accuracy points of the base on every task")
    build.set_defaults(run=_build)

    search = commands.add_parser("search", help="quality/speed frontier over SwiftKV depths; picks the fastest "
                                                "depth within a quality budget")
    search.add_argument("--model", default=DEFAULT_MODEL, help="base model (default: %(default)s)")
    search.add_argument("--out", default="runs/smollm2-search", help="search directory (default: %(default)s)")
    search.add_argument("--depths", type=int, nargs="+",
                        help="num_key_value_layers of each point (default: 1/3, 1/2, 2/3, 4/5 and 14/15 of the layers)")
    search.add_argument("--group-sizes", type=int, nargs="+", default=[1], help="AcrossKV group sizes to try")
    search.add_argument("--max-quality-drop", type=float, default=1.0, metavar="POINTS",
                        help="accuracy points any task may lose (default: %(default)s)")
    search.add_argument("--tasks", nargs="+", help=f"quality tasks (default: {' '.join(DEFAULT_TASKS)})")
    search.add_argument("--eval-limit", type=int, help="examples per task (default: 500; 0: all)")
    search.add_argument("--ttft-tokens", type=int, help="prompt length of the speed pass (default: 2048)")
    search.add_argument("--serving-requests", type=int, help="requests of the speed pass's serving run (default: 8)")
    search.add_argument("--speed-rounds", type=int,
                        help="rounds of the speed pass, each timing every system once (default: 3; medians)")
    _add_distill_config_flags(search)
    search.set_defaults(run=_search)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, OSError) as error:  # bad input or an unusable path: one line, no traceback
        print(f"swiftkv {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
