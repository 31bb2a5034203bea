"""The default corpus's text people wrote: Python's documentation, read from source, cached, and mixed in."""

from __future__ import annotations

import textwrap

import pytest

from swiftkv.distill import DistillConfig, corpus, documentation, load_records
from swiftkv.distill.documentation import module_documentation, passages, stdlib_docstrings

from conftest import make_tiny_tokenizer
from test_distill import tiny_teacher

LONG = "This paragraph explains at some length what the code does, why it does it, and what a caller should expect."


def test_a_module_documentation_is_its_long_docstrings_in_source_order_each_once():
    source = textwrap.dedent(f'''
        """{LONG} Module."""

        def helper():
            """Short."""

        class Thing:
            """{LONG} Class."""

            def method(self):
                """{LONG} Class."""

        async def later():
            """{LONG} Function."""
        ''')
    assert module_documentation(source).split("\n\n") == [f"{LONG} Module.", f"{LONG} Class.", f"{LONG} Function."]


def test_passages_end_at_paragraph_breaks_after_enough_words():
    text = "\n\n".join(f"paragraph {i} " + "word " * 8 for i in range(5))  # 10 words each
    cut = passages(text, words=25)
    assert [len(p.split()) for p in cut] == [30, 20]
    assert "\n\n".join(cut) == "\n\n".join(p.strip() for p in text.split("\n\n"))


def test_the_standard_library_is_read_without_importing_it_and_test_suites_are_left_out(tmp_path):
    (tmp_path / "tool.py").write_text(f'"""{LONG} Tool."""\nraise SystemExit("imported")\n')
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_tool.py").write_text(f'"""{LONG} Test."""\n')
    (tmp_path / "template.py").write_text("def broken(:\n")
    assert stdlib_docstrings(root=tmp_path) == [f"{LONG} Tool."]


@pytest.fixture
def small_documentation(monkeypatch):
    """Twelve 20-word passages instead of the whole standard library (which takes about a minute to read)."""
    pool = [f"passage {i} " + "word " * 18 for i in range(12)]
    monkeypatch.setattr(documentation, "python_documentation", lambda: list(pool))
    return pool


def test_documentation_records_are_a_seeded_sample_of_about_the_words_asked(small_documentation):
    records = documentation.documentation_records(70, seed=0)
    assert len(records) == 4 and all(r["text"] in small_documentation for r in records)
    assert documentation.documentation_records(70, seed=0) == records
    assert documentation.documentation_records(70, seed=1) != records
    assert documentation.documentation_records(0) == []


def test_the_documentation_corpus_is_cached_and_keyed_like_the_teacher_texts(small_documentation, tmp_path,
                                                                             monkeypatch):
    records = corpus.documentation_corpus(70, cache_dir=tmp_path)

    def not_again(*args):
        raise AssertionError("the cached passages were not reused")

    with monkeypatch.context() as patched:
        patched.setattr(corpus, "documentation_records", not_again)
        assert corpus.documentation_corpus(70, cache_dir=tmp_path) == records
    corpus.documentation_corpus(40, cache_dir=tmp_path)
    corpus.documentation_corpus(70, seed=1, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("documentation-*.jsonl"))) == 3


@pytest.mark.parametrize("words, passages_in", [(0, 0), (70, 4)])
def test_the_default_corpus_mixes_in_the_documentation_words_asked(small_documentation, tmp_path, monkeypatch,
                                                                   words, passages_in):
    monkeypatch.setenv("SWIFTKV_CACHE", str(tmp_path))
    config = DistillConfig(corpus_prompts=4, corpus_max_new_tokens=4, corpus_free_text_ratio=0.0,
                           corpus_documentation_words=words)
    records = load_records(["default"], tiny_teacher, make_tiny_tokenizer(), config)
    assert sum(r.get("text") in small_documentation for r in records) == passages_in
    assert sum("response" in r for r in records) == 4


def test_a_negative_documentation_budget_is_refused():
    with pytest.raises(ValueError, match="corpus_documentation_words"):
        DistillConfig(corpus_documentation_words=-1)
