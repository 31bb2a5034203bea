"""Teacher-corpus generation speed: the engine's top-p sampler vs a full-vocabulary sort, in one run.

The default distillation corpus is sampled (temperature 0.7, top-p 0.95) by the engine, 32 answers at a
time. The baseline sampler here is the textbook one the engine used before: sort the whole vocabulary
for every token, then draw over all of it. Both samplers generate the same built-in prompts with the same
teacher (the embedded model with swiftkv off); only the sampler differs. Writes JSON and a PNG bar plot.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from swiftkv.distill import corpus_teacher
from swiftkv.distill.corpus import generate_responses
from swiftkv.distill.prompts import builtin_prompts
from swiftkv.engine import llm_engine
from swiftkv.engine.sequence import Sequence
from swiftkv.loading import DEFAULT_MODEL, load_tokenizer
from swiftkv.plotting import png_figure


def full_sort_sample(logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
    """Baseline: per token, sort all of the vocabulary for top-p and draw over all of it (top-k not used here)."""
    tokens = []
    for row, sequence in enumerate(sequences):
        params = sequence.params
        scores = logits[row] / params.temperature
        sorted_scores, order = scores.sort(descending=True)
        probabilities = sorted_scores.softmax(-1)
        drop = probabilities.cumsum(-1) - probabilities >= params.top_p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        tokens.append(int(torch.multinomial(scores.softmax(-1), 1, generator=sequence.generator)))
    return tokens


def timed_corpus(teacher, tokenizer, prompts: list[str], max_new_tokens: int) -> dict:
    started = time.perf_counter()
    responses = generate_responses(teacher, tokenizer, prompts, max_new_tokens, batch_size=32, temperature=0.7,
                                   seed=0)
    seconds = time.perf_counter() - started
    new_tokens = sum(len(tokenizer(r, add_special_tokens=False).input_ids) for r in responses)
    return {"seconds": seconds, "answers_per_second": len(prompts) / seconds, "new_tokens": new_tokens,
            "tokens_per_second": new_tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/corpus")
    args = parser.parse_args()

    teacher = corpus_teacher(args.model)()  # bf16, swiftkv off where the model is a SwiftKV checkpoint
    tokenizer = load_tokenizer(args.model)
    prompts = builtin_prompts(0)[: args.prompts]
    engine_sampler = llm_engine.sample
    llm_engine.sample = full_sort_sample
    try:
        baseline = timed_corpus(teacher, tokenizer, prompts, args.max_new_tokens)
    finally:
        llm_engine.sample = engine_sampler
    engine = timed_corpus(teacher, tokenizer, prompts, args.max_new_tokens)
    result = {"model": args.model, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
              "batch_size": 32, "threads": torch.get_num_threads(), "full_sort_sampler": baseline,
              "engine_sampler": engine, "speedup": baseline["seconds"] / engine["seconds"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result, indent=2))


def plot(result: dict, path: Path) -> None:
    names = ["full-vocabulary sort", "engine (top-256 nucleus)"]
    rates = [result["full_sort_sampler"]["answers_per_second"], result["engine_sampler"]["answers_per_second"]]
    with png_figure(path, figsize=(5, 4), dpi=120) as (fig, ax):
        ax.bar(names, rates, color=["tab:gray", "tab:blue"])
        ax.text(1, rates[1], f"{result['speedup']:.2f}x", ha="center", va="bottom")
        ax.set_ylabel("teacher answers per second")
        ax.set_title(f"teacher corpus: {result['prompts']} prompts x {result['max_new_tokens']} tokens, "
                     f"{result['threads']} threads", fontsize=9)


if __name__ == "__main__":
    main()
