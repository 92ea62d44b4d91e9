"""Small helpers shared by the report sections: newest record per key, markdown tables, plotting."""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

__all__ = ["latest", "markdown_table", "pyplot", "save_fig"]


def latest(recs: list[dict], key: tuple[str, ...]) -> list[dict]:
    """Keep the newest record for each key (records are appended in time order)."""
    out: OrderedDict = OrderedDict()
    for r in recs:
        out[tuple(str(r.get(k)) for k in key)] = r
    return list(out.values())


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (reports are written headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_fig(fig: Any, path: Path) -> None:
    """Write a figure atomically (a PNG is never left half-written)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
