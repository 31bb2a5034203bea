"""The side-by-side table: terminal (rich), JSON and Markdown from the same rows."""

from __future__ import annotations

import json
from pathlib import Path

from swiftkv.eval.runner import ComparisonRow
from swiftkv.eval.statistics import Estimate


def _cell(estimate: Estimate | None, signed: bool = False) -> str:
    if estimate is None:
        return "—"
    sign = "+" if signed else ""
    return f"{estimate.value:{sign}.4f} [{estimate.low:{sign}.4f}, {estimate.high:{sign}.4f}]"


def _significance(row: ComparisonRow) -> str:
    if row.difference is None:
        return ""
    if row.difference.low <= 0 <= row.difference.high:
        return "within noise"
    better = (row.difference.value > 0) == row.higher_is_better
    return "better" if better else "worse"


HEADER = ["task", "metric", "n", "baseline (95% CI)", "model (95% CI)", "difference (95% CI)", ""]


def table_rows(rows: list[ComparisonRow]) -> list[list[str]]:
    return [[r.task, r.metric, str(r.num_examples), _cell(r.baseline), _cell(r.model), _cell(r.difference, True),
             _significance(r)] for r in rows]


def to_markdown(rows: list[ComparisonRow], title: str) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines) + "\n"


def print_table(rows: list[ComparisonRow], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in HEADER:
        table.add_column(column)
    for cells in table_rows(rows):
        table.add_row(*cells)
    Console(width=200).print(table)


def write_report(rows: list[ComparisonRow], out_dir: str | Path, title: str, settings: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps({"title": title, "settings": settings,
                                                   "rows": [r.as_dict() for r in rows]}, indent=2))
    (out_dir / "eval.md").write_text(to_markdown(rows, title))
    return out_dir
