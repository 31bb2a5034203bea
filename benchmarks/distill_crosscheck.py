"""Score distilled SwiftKV checkpoints on the held-out teacher prompts of each default-corpus setting.

Each `benchmarks/distill.py` run reports agreement on the held-out part of its own corpus, so two recipes
with different corpora (e.g. 512 prompts x 128 tokens vs 1000 x 192) are scored on different prompts.
This puts every checkpoint on every held-out set, with the trainer's metric (`swiftkv.eval.fidelity`: packed
blocks, bf16 autocast, KL at T=1 and top-1 agreement against the same weights with swiftkv off), block by
block, so every checkpoint after the first also gets its paired agreement difference to the first with a 95%
bootstrap interval over blocks (`swiftkv.eval.statistics.paired_difference`). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from swiftkv.distill import DEFAULT_DATA, DistillConfig, distillation_blocks
from swiftkv.distill.data import encode_record, pack_sequences, split_records
from swiftkv.distill.prompts import builtin_prompts
from swiftkv.eval.fidelity import measure_fidelity
from swiftkv.eval.statistics import paired_difference
from swiftkv.loading import load_model, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="distilled SwiftKV checkpoints")
    parser.add_argument("--corpora", nargs="+", default=["512x128", "1000x192"],
                        help="default-corpus settings as PROMPTSxMAX_NEW_TOKENS[xSAMPLES]")
    parser.add_argument("--teacher", default="runs/bench-distill/converted",
                        help="the checkpoint whose swiftkv-off mode wrote the corpora (any conversion of the base)")
    parser.add_argument("--unseen-after", type=int, default=0,
                        help="score only held-out prompts outside the first N built-in prompts: prompts that a "
                             "model distilled on an N-prompt corpus never saw, whichever split it used")
    parser.add_argument("--out", default="benchmarks/results/distill_crosscheck.json")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.teacher)
    held_out = {}
    for corpus in args.corpora:
        prompts, max_new_tokens, samples = (int(part) for part in (corpus + "x1").split("x")[:3])
        corpus_config = DistillConfig(corpus_prompts=prompts, corpus_max_new_tokens=max_new_tokens,
                                      corpus_samples=samples)
        records, _, blocks = distillation_blocks([DEFAULT_DATA], args.teacher, tokenizer, corpus_config)
        if args.unseen_after:
            seen = set(builtin_prompts(corpus_config.seed)[:args.unseen_after])
            unseen = [r for r in split_records(records, corpus_config.eval_fraction, corpus_config.seed)[1]
                      if r["prompt"] not in seen]
            blocks = pack_sequences([encode_record(r, tokenizer) for r in unseen], corpus_config.seq_length)
        held_out[corpus] = blocks
    # max_eval_blocks as in training, so numbers match the runs' own reports; all of an unseen-prompt set
    config = DistillConfig(max_eval_blocks=10**6 if args.unseen_after else DistillConfig.max_eval_blocks)
    results, per_block, first = {}, {}, args.checkpoints[0]
    for checkpoint in args.checkpoints:
        student = load_model(checkpoint, dtype="float32")
        student.config.swiftkv = True
        results[checkpoint] = {}
        for corpus, blocks in held_out.items():
            blocks = blocks[: config.max_eval_blocks]
            fidelity = measure_fidelity(student, blocks, autocast_dtype=torch.bfloat16)
            per_block[checkpoint, corpus] = fidelity.per_sequence_agreement
            results[checkpoint][corpus] = {"eval_kl": fidelity.kl, "eval_top1_agreement": fidelity.top1_agreement,
                                           "blocks": len(blocks)}
            if checkpoint != first:
                difference = paired_difference(per_block[checkpoint, corpus], per_block[first, corpus],
                                               resamples=10_000)
                results[checkpoint][corpus][f"agreement_minus_{first}"] = {
                    "mean": difference.value, "ci95": [difference.low, difference.high]}
            print(checkpoint, corpus, results[checkpoint][corpus], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
