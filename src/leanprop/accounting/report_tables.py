"""Small helpers shared by the report sections: newest record per key, markdown tables."""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["latest", "markdown_table"]


def latest(recs: list[dict], key: tuple[str, ...]) -> list[dict]:
    """Keep the newest record for each key (records are appended in time order)."""
    out: OrderedDict = OrderedDict()
    for r in recs:
        out[tuple(str(r.get(k)) for k in key)] = r
    return list(out.values())


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
