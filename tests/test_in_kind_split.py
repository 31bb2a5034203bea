"""benchmarks/in_kind_split.py: WikiText-2 articles and LAMBADA passages split into a half to train on and a
half to score, with no item in both, and a data folder in which only the scored half is an evaluation set."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import in_kind_split  # noqa: E402
from swiftkv.distill.contamination import drop_evaluation_text  # noqa: E402


def article(title: str, words: int) -> str:
    body = " ".join(f"{title.lower()}{i}" for i in range(words))
    return f" = {title} = \n \n {body} \n \n = = Section = = \n \n {body} . \n \n"


def test_articles_start_at_titles_and_sections_stay_inside():
    text = article("Alpha", 5) + article("Beta", 5) + article("Gamma", 5)
    articles = in_kind_split.wikitext_articles(text)
    assert [a.split("\n")[0] for a in articles] == [" = Alpha = ", " = Beta = ", " = Gamma = "]
    assert "".join(articles) == text


def test_split_puts_every_item_in_exactly_one_half():
    train, scored = in_kind_split.split_halves(list(range(7)))
    assert train == [0, 2, 4, 6] and scored == [1, 3, 5]


def test_scored_folder_guards_the_scored_half_and_links_the_rest(tmp_path, monkeypatch):
    source = tmp_path / "data"
    source.mkdir()
    titles = ["Alpha", "Beta", "Gamma", "Delta"]
    (source / in_kind_split.WIKITEXT).write_text("".join(article(t, 40) for t in titles))
    passages = [" ".join(f"p{n}w{i}" for i in range(30)) for n in range(4)]
    (source / in_kind_split.LAMBADA).write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    (source / "hellaswag.jsonl").write_text('{"ctx": "x"}\n')
    monkeypatch.setenv("SWIFTKV_DATA_DIR", str(source))
    monkeypatch.setattr(sys, "argv", ["in_kind_split.py", "--out", str(tmp_path / "out")])

    in_kind_split.main()

    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    trained = " ".join(r["text"] for r in records)
    scored = (out / "scored" / in_kind_split.WIKITEXT).read_text()
    assert "alpha0" in trained and "gamma0" in trained and "beta0" not in trained and "delta0" not in trained
    assert "beta0" in scored and "delta0" in scored and "alpha0" not in scored
    scored_lambada = (out / "scored" / in_kind_split.LAMBADA).read_text()
    assert "p1w0" in scored_lambada and "p0w0" not in scored_lambada and "p0w0" in trained
    assert (out / "scored" / "hellaswag.jsonl").resolve() == (source / "hellaswag.jsonl").resolve()
    kept, caught = drop_evaluation_text(records, out / "scored")
    assert kept == records and caught == {}
    kept, caught = drop_evaluation_text(records + [{"text": scored}], out / "scored")
    assert kept == records and caught == {in_kind_split.WIKITEXT: 1}
