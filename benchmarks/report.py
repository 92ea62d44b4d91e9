"""JSONL benchmark records -> ``docs/benchmarks.md`` (generated; do not edit by hand).

    python benchmarks/report.py            # the same as `leanprop report` (run from the repository root)

The report lives in the package (:mod:`leanprop.accounting.report`); this wrapper keeps the benchmark scripts'
imports (``from report import append_records, write_report``) working.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from leanprop.accounting.report import (  # noqa: F401 -- re-exported for the benchmark scripts
    _atomic_write,
    append_records,
    read_records,
    render,
    run_context,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate docs/benchmarks.md from benchmark JSONL files.")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    a = ap.parse_args(argv)
    write_report(Path(a.results), Path(a.out))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
