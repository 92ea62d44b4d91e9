"""Small helpers shared by the report sections: newest record per key, markdown tables, plotting."""

from __future__ import annotations

import os
import re
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

__all__ = ["METHOD_ORDER", "latest", "markdown_table", "method_rank", "pyplot", "save_fig"]

# the methods of `leanprop bench matrix`, in the order tables and plots list them (others follow, by name)
METHOD_ORDER = ("dense", "checkpoint", "swat-u90", "swat-u90-packed", "swat-erk90", "swat-filter70",
                "swat-filter70-p10", "blpa8", "blpa4", "blpa2", "swat-u90+blpa4")


def latest(recs: list[dict], key: tuple[str, ...]) -> list[dict]:
    """Keep the newest record for each key (records are appended in time order)."""
    out: OrderedDict = OrderedDict()
    for r in recs:
        out[tuple(str(r.get(k)) for k in key)] = r
    return list(out.values())


def malloc_settings(r: dict) -> str:
    """A record's glibc malloc settings (``leanprop.allocator.describe`` after ``system, ``), e.g. ``mmap threshold
    256 KiB, huge pages``; empty for an allocator's defaults (so a newer default record still supersedes an older
    one made under another default allocator)."""
    alloc = str(r.get("allocator", ""))
    return alloc.split(", ", 1)[1] if alloc.startswith("system, ") else ""


def malloc_tag(r: dict) -> str:
    """File-name suffix of :func:`malloc_settings`: ``-mmap256KiB``, ``-thp`` (huge pages), both, or empty."""
    settings = malloc_settings(r)
    m = re.search(r"mmap threshold (\d+) (KiB|B)", settings)
    return ("" if m is None else f"-mmap{m.group(1)}{m.group(2)}") + ("-thp" if "huge pages" in settings else "")


def method_rank(method: str) -> tuple[int, str]:
    """Sort key of a method name: its place in :data:`METHOD_ORDER`, then the name."""
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


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
