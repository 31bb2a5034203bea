"""A corpus of text people wrote, for distillation experiments: passages of Python's documentation (the
reStructuredText sources of docs.python.org), FOLDOC (an encyclopedia of computing), the Jargon File, Ambrose
Bierce's Devil's Dictionary and the fortune-cookie collection, as they are packaged by Debian. None of it is an
evaluation set (and distillation drops any record that shares 13 words with one). Writes `{"text", "source"}`
JSONL, seeded, about `--words` words in the shares below.

Needs a Debian or Ubuntu machine with apt (the packages are only downloaded and unpacked, not installed):

  python benchmarks/human_text_corpus.py --out runs/human_text.jsonl
  swiftkv distill --model runs/l15/converted --data default runs/human_text.jsonl --out runs/human-l15
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import subprocess
import tempfile
from pathlib import Path

from swiftkv.distill.documentation import first_words, passages

PACKAGES = ["python3.11-doc", "dict-foldoc", "dict-jargon", "dict-devil", "fortunes", "fortunes-min"]
SHARES = {"python_docs": 0.52, "foldoc": 0.24, "jargon": 0.10, "devil": 0.06, "fortunes": 0.08}
PYTHON_DOC_PARTS = ("tutorial", "howto", "faq", "library", "reference", "using", "extending")
RST_MARKUP = re.compile(r"[=\-~^*#\"]{3,}")  # section underlines


def unpack(packages: list[str], folder: Path) -> Path:
    """Download the Debian packages into `folder` and unpack them under `folder/root`."""
    subprocess.run(["apt-get", "download", *packages], cwd=folder, check=True, capture_output=True)
    for deb in sorted(folder.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(folder / "root")], check=True)
    return folder / "root" / "usr" / "share"


def python_doc_passages(share: Path) -> list[str]:
    sources = share / "doc" / "python3.11" / "html" / "_sources"
    out = []
    for path in sorted(sources.rglob("*.rst.txt")):
        if path.relative_to(sources).parts[0] not in PYTHON_DOC_PARTS:
            continue
        lines = path.read_text(errors="ignore").splitlines()
        text = "\n".join(line for line in lines if not line.lstrip().startswith(".. ")
                         and not RST_MARKUP.fullmatch(line.strip()))
        out += passages(text, 600)
    return out


def dictionary_passages(share: Path, name: str) -> list[str]:
    return passages(gzip.open(share / "dictd" / f"{name}.dict.dz", "rt", errors="ignore").read(), 500)


def fortune_passages(share: Path) -> list[str]:
    out = []
    for path in sorted((share / "games" / "fortunes").iterdir()):
        if path.suffix or path.name == "ascii-art":
            continue
        items = [item.strip() for item in path.read_text(errors="ignore").split("\n%\n") if item.strip()]
        out += ["\n\n".join(items[i:i + 12]) for i in range(0, len(items), 12)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--words", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        share = unpack(PACKAGES, Path(folder))
        pools = {"python_docs": python_doc_passages(share), "foldoc": dictionary_passages(share, "foldoc"),
                 "jargon": dictionary_passages(share, "jargon"), "devil": dictionary_passages(share, "devil"),
                 "fortunes": fortune_passages(share)}
    records = []
    for source, pool in pools.items():
        rng.shuffle(pool)
        taken = first_words(pool, round(args.words * SHARES[source]))
        records += [{"text": passage, "source": source} for passage in taken]
        print(f"{source}: {sum(len(passage.split()) for passage in taken)} words from {len(pool)} passages")
    rng.shuffle(records)
    Path(args.out).write_text("".join(json.dumps(record) + "\n" for record in records))
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
