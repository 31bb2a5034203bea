"""PNG figures for reports and benchmarks: drawn headless (Agg), laid out tight, saved, always closed."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def png_figure(path: str | Path, *subplots_args, dpi: int = 110, **subplots_kwargs) -> Iterator[tuple]:
    """`with png_figure(path, 1, 2, figsize=(11, 4)) as (fig, axes):` draw; the PNG is written on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*subplots_args, **subplots_kwargs)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(Path(path), dpi=dpi)
    finally:
        plt.close(fig)
