"""A diagnostic: what does distilling on text of the evaluation's own kind do for raw-text quality?

The student follows its teacher best on the kinds of text it saw (`fidelity_by_text.py`), and the raw-text
evaluations are encyclopedia articles (WikiText-2) and novels (LAMBADA). No training text of those kinds is
available offline here, so this splits the two evaluation sets themselves: every other WikiText-2 article and
every other LAMBADA passage go into a training file, and the rest into a folder of evaluation sets in which
these two files hold only the other half (every other evaluation file is linked as it is). With
`SWIFTKV_DATA_DIR` pointing at that folder, distillation's contamination check guards the scored half, and
`swiftkv eval` scores only it, so no scored text is trained on. The checkpoint this yields answers a question
(would in-kind text reach a quality target?); it is not a model to ship, since its evaluation sets are halved.

  python benchmarks/in_kind_split.py --out runs/in-kind
  export SWIFTKV_DATA_DIR=runs/in-kind/scored
  swiftkv distill --model runs/l15/converted --data default runs/in-kind/train.jsonl --out runs/in-kind-l15
  swiftkv eval --model runs/in-kind-l15/model --tasks lambada wikitext2 --limit 500 --out runs/in-kind-l15/quality
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from swiftkv.distill.documentation import passages
from swiftkv.eval.data import data_dir

WIKITEXT = "wikitext2_test_raw.txt"
LAMBADA = "lambada_openai.jsonl"
ARTICLE_TITLE = re.compile(r"^ = [^=].* = $", re.MULTILINE)  # " = Title = "; sections are " = = Title = = "


def wikitext_articles(text: str) -> list[str]:
    """WikiText-2's raw text cut into articles, each starting at its title line."""
    starts = [match.start() for match in ARTICLE_TITLE.finditer(text)]
    return [text[start:end] for start, end in zip(starts, starts[1:] + [len(text)])]


def split_halves(items: list) -> tuple[list, list]:
    """(even-numbered items to train on, odd-numbered items to score): both halves span the whole set."""
    return items[0::2], items[1::2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--words-per-passage", type=int, default=600)
    args = parser.parse_args()
    source, out = data_dir(), Path(args.out)
    scored = out / "scored"
    scored.mkdir(parents=True, exist_ok=True)

    train_articles, scored_articles = split_halves(wikitext_articles((source / WIKITEXT).read_text()))
    lambada_lines = [line for line in (source / LAMBADA).read_text().splitlines() if line.strip()]
    train_lambada, scored_lambada = split_halves(lambada_lines)

    records = [{"text": passage, "source": "wikitext2"}
               for article in train_articles for passage in passages(article, args.words_per_passage)]
    records += [{"text": json.loads(line)["text"], "source": "lambada"} for line in train_lambada]
    (out / "train.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))

    (scored / WIKITEXT).write_text("".join(scored_articles))
    (scored / LAMBADA).write_text("".join(line + "\n" for line in scored_lambada))
    for path in sorted(source.iterdir()):
        link = scored / path.name
        if path.name not in (WIKITEXT, LAMBADA) and not link.exists():
            link.symlink_to(path.resolve())

    words = {name: sum(len(r["text"].split()) for r in records if r["source"] == name)
             for name in ("wikitext2", "lambada")}
    print(f"train: {len(train_articles)} WikiText-2 articles ({words['wikitext2']} words), "
          f"{len(train_lambada)} LAMBADA passages ({words['lambada']} words) -> {out / 'train.jsonl'}")
    print(f"scored: {len(scored_articles)} articles, {len(scored_lambada)} passages -> {scored} "
          f"(use it as SWIFTKV_DATA_DIR)")


if __name__ == "__main__":
    main()
