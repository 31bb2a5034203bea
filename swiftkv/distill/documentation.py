"""Text people wrote, available offline on every machine that runs swiftkv: the documentation inside Python's
standard library (module, class and function docstrings, read from the source files without importing them,
and the language reference's topics that `help()` shows).

A SwiftKV student distilled on the teacher's own texts alone follows its teacher about three times less closely
(per-token KL) on text people wrote (`benchmarks/fidelity_by_text.py`). Distilling on text people wrote, scored by
the teacher, closes much of that gap on text of the same kinds, and little of it on other kinds.
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
import warnings
from pathlib import Path

# Test suites, demos and GUI code: docstrings about tests or widgets, not prose
SKIPPED_PARTS = {"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages",
                 "dist-packages", "ensurepip", "__pycache__"}
MIN_DOCSTRING_WORDS = 20


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_documentation(source: str) -> str:
    """The docstrings of one module's source, module first, then classes and functions in source order,
    each once; short ones (signatures, one-liners) left out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        tree = ast.parse(source)
    nodes = [tree] + [node for node in ast.walk(tree)
                      if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    docstrings = []
    for node in sorted(nodes, key=lambda node: getattr(node, "lineno", 0)):
        docstring = ast.get_docstring(node)
        if docstring and len(docstring.split()) >= MIN_DOCSTRING_WORDS and docstring not in docstrings:
            docstrings.append(docstring)
    return "\n\n".join(docstrings)


def passages(text: str, words: int) -> list[str]:
    """`text` cut at paragraph breaks into passages of about `words` words (a paragraph is never split)."""
    out, current, count = [], [], 0
    for paragraph in re.split(r"\n\s*\n", text):
        if paragraph.strip():
            current.append(paragraph.strip())
            count += len(paragraph.split())
        if count >= words:
            out.append("\n\n".join(current))
            current, count = [], 0
    if current:
        out.append("\n\n".join(current))
    return out


def stdlib_docstrings(root: Path | None = None) -> list[str]:
    """Each standard-library module's documentation (`module_documentation`), files in sorted order."""
    documents = []
    root = root or stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_PARTS & set(path.relative_to(root).parts):
            continue
        try:
            documents.append(module_documentation(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # a few files are templates or other encodings
            continue
    return [document for document in documents if document]


def reference_topics() -> list[str]:
    """The language reference's sections that `help()` shows, sorted by topic name."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions ship Python without it
        return []
    return [topics[name] for name in sorted(topics)]


def python_documentation(words_per_passage: int = 600) -> list[str]:
    """Passages of the standard library's documentation, in a fixed order; the same Python version gives the
    same passages on every machine."""
    return [passage for document in stdlib_docstrings() + reference_topics()
            for passage in passages(document, words_per_passage)]


def first_words(passages_in_order: list[str], num_words: int) -> list[str]:
    """The leading passages, up to the first that brings their words to `num_words` or more."""
    taken, total = [], 0
    for passage in passages_in_order:
        if total >= num_words:
            break
        taken.append(passage)
        total += len(passage.split())
    return taken


def documentation_records(num_words: int, seed: int = 0) -> list[dict]:
    """`{"text"}` records of about `num_words` words, passages drawn at random (seeded) from
    `python_documentation()`."""
    if num_words <= 0:
        return []
    pool = python_documentation()
    random.Random(seed).shuffle(pool)
    return [{"text": passage} for passage in first_words(pool, num_words)]
