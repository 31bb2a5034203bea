"""How closely a SwiftKV checkpoint follows its base model on each kind of text: the teacher's own held-out
chat answers and raw texts (what distillation trains on), and text people wrote (WikiText-2 articles, LAMBADA's
novel passages, and the held-out part of any `--text NAME=FILE` given, split as distillation splits its data).
Per-token KL(base || SwiftKV) and top-1 agreement, with 95% bootstrap CIs over blocks. A checkpoint that
follows the teacher on the teacher's text but not on human text has learned the teacher's text, not the teacher. Writes JSON and a PNG.

  python benchmarks/fidelity_by_text.py --models runs/smollm2-search/points/l15-g1/model
  python benchmarks/fidelity_by_text.py --models runs/all-l15/model --baseline smollm2-135m-instruct
  # your own documents (the part distillation holds out, trained on them or not):
  python benchmarks/fidelity_by_text.py --models runs/distill/model --text "our documents=docs.jsonl"
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from swiftkv.distill import DistillConfig
from swiftkv.distill.corpus import free_text_corpus, teacher_corpus
from swiftkv.distill.data import encode_record, pack_sequences, read_records, split_records
from swiftkv.eval.data import data_dir, data_file
from swiftkv.eval.fidelity import measure_fidelity
from swiftkv.eval.statistics import bootstrap
from swiftkv.loading import load_model, load_tokenizer
from swiftkv.models.swiftkv import swiftkv_mode
from swiftkv.plotting import png_figure


def packed_blocks(records: list[dict], tokenizer, config: DistillConfig, count: int) -> torch.Tensor:
    """The first `count` blocks of `records`, encoded and packed as distillation packs them."""
    return pack_sequences([encode_record(record, tokenizer) for record in records], config.seq_length)[:count]


def held_out_blocks(records: list[dict], tokenizer, config: DistillConfig, count: int) -> torch.Tensor:
    """Blocks of the records distillation holds out (the same seeded split), never trained on."""
    return packed_blocks(split_records(records, config.eval_fraction, config.seed)[1], tokenizer, config, count)


def kinds_of_text(teacher, tokenizer, extra: dict[str, str], count: int) -> dict[str, torch.Tensor]:
    """Token blocks per kind of text: the default corpus's held-out parts (from its cache, written by `teacher`,
    a model in teacher mode, when missing) and human-written texts."""
    config = DistillConfig()
    chat = teacher_corpus(teacher, tokenizer, num_prompts=config.corpus_prompts,
                          max_new_tokens=config.corpus_max_new_tokens, seed=config.seed)
    free = free_text_corpus(teacher, tokenizer, config.corpus_free_texts,
                            max_new_tokens=config.corpus_free_text_max_new_tokens, seed=config.seed)
    wikitext = [{"text": data_file("wikitext2_test_raw.txt").read_text()}]
    lambada_lines = data_file("lambada_openai.jsonl").read_text().splitlines()
    lambada = [{"text": json.loads(line)["text"]} for line in lambada_lines]
    blocks = {
        "teacher chat answers (held out)": held_out_blocks(chat, tokenizer, config, count),
        "teacher raw text (held out)": held_out_blocks(free, tokenizer, config, count),
        "WikiText-2 (human)": packed_blocks(wikitext, tokenizer, config, count),
        "LAMBADA passages (human)": packed_blocks(lambada, tokenizer, config, count),
    }
    for name, path in extra.items():
        blocks[name] = held_out_blocks(read_records(path), tokenizer, config, count)
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="SwiftKV checkpoints")
    parser.add_argument("--baseline", help="the base model, for checkpoints that no longer hold it (default: "
                                           "each checkpoint with SwiftKV off)")
    parser.add_argument("--text", nargs="*", default=[], metavar="NAME=FILE",
                        help="more data to score, as `swiftkv distill --data` reads it (its held-out part)")
    parser.add_argument("--blocks", type=int, default=16, help="512-token blocks per kind of text")
    parser.add_argument("--out", default="benchmarks/results/fidelity_by_text")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.text)
    settings = {**vars(args), "evaluation_data": str(data_dir())}  # WikiText-2 and LAMBADA come from here
    results = {"date": time.strftime("%Y-%m-%d"), "settings": settings, "models": {}}
    for path in args.models:
        tokenizer = load_tokenizer(path)
        student = load_model(path, dtype="bfloat16")
        teacher = load_model(args.baseline, dtype="bfloat16") if args.baseline else None
        with nullcontext() if teacher else swiftkv_mode(student, enabled=False):
            blocks = kinds_of_text(teacher or student, tokenizer, extra, args.blocks)
        rows = {}
        for kind, kind_blocks in blocks.items():
            fidelity = measure_fidelity(student, list(kind_blocks), teacher=teacher)
            rows[kind] = {**fidelity.summary(), "blocks": len(kind_blocks),
                          "kl_per_block": bootstrap(fidelity.per_sequence_kl).as_dict(),
                          "agreement_per_block": bootstrap(fidelity.per_sequence_agreement).as_dict()}
            print(f"{path} | {kind}: KL {fidelity.kl:.3f}, top-1 agreement {fidelity.top1_agreement:.3f}",
                  flush=True)
        results["models"][path] = rows
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    with png_figure(out.with_suffix(".png"), 1, 1, figsize=(8, 4.5)) as (_, axes):
        kinds = list(next(iter(results["models"].values())))
        width = 0.8 / len(results["models"])
        for index, (path, rows) in enumerate(results["models"].items()):
            axes.bar([k + index * width for k in range(len(kinds))], [rows[kind]["kl"] for kind in kinds],
                     width, label=path)
        axes.set_xticks([k + 0.4 - width / 2 for k in range(len(kinds))], kinds, rotation=15, fontsize=7,
                        ha="right")
        axes.set_ylabel("KL(base || SwiftKV) per token")
        axes.set_title("fidelity to the base model by kind of text")
        axes.legend(fontsize=7)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
