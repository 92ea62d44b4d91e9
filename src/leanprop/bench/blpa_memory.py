"""``leanprop bench blpa_memory``: memory kept for backward by dense, per-block checkpointing and BLPA 8/4/2-bit
(docs/methods/blpa.md), on several models.

For each model: the saved-tensor audit of one training forward pass (bytes kept for backward, deduplicated,
parameters excluded), the peak of one training step in a fresh process, and optionally the largest batch under
a memory cap; one JSONL record per (model, method), the same records as ``leanprop bench memory --jsonl``.
``docs/benchmarks.md`` ("Memory kept for backward") is regenerated from them. Run it on a quiet machine.

    leanprop bench blpa_memory                                   # preact_resnet164 + 56, bs 128, 5 methods
    leanprop bench blpa_memory --models preact_resnet56 --methods dense,blpa4 --mem-cap 4GiB
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parser", "run", "main"]

KIND = "blpa_memory"


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(KIND, help="memory kept for backward: dense, checkpoint, BLPA-8/4/2 on several models",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["preact_resnet164", "preact_resnet56"])
    p.add_argument("--methods", default="dense,checkpoint,blpa8,blpa4,blpa2")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--input-size", type=int, default=32, help="CIFAR: 32 (inputs 3xSxS)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mem-cap", default=None, help="also search the largest batch under this cap, e.g. 4GiB")
    p.add_argument("--max-batch-tolerance", type=float, default=0.0,
                   help="relative resolution of the --mem-cap search (0: exact; 0.02: within 2 %%, fewer probes)")
    p.add_argument("--no-peak", dest="peak", action="store_false", help="saved bytes only (no probe processes)")
    p.add_argument("--out", default="benchmarks/results/memory.jsonl")
    p.add_argument("--report", default="docs/benchmarks.md", help="'' to skip the report")
    p.set_defaults(bench_run=run)


def run(a: argparse.Namespace) -> int:
    from leanprop.accounting.memory import parse_size
    from leanprop.bench.memory import default_model_kwargs, format_table, measure_methods, parse_methods
    from leanprop.bench.report import write_report
    from leanprop.utils import append_jsonl

    methods = parse_methods([a.methods])
    cap = parse_size(a.mem_cap) if a.mem_cap else None
    failed = False
    for name in a.models:
        base = {"model": name, "model_kwargs": default_model_kwargs(name, {}), "threads": a.threads,
                "input_shape": [3, a.input_size, a.input_size], "device": a.device}
        records = measure_methods(base, methods, a.batch, peak=a.peak, mem_cap=cap, progress=sys.stderr.isatty(),
                                  tolerance=a.max_batch_tolerance)
        print(f"{name}, batch {a.batch}")
        print(format_table(records), flush=True)
        good = [r for r in records if "saved_bytes" in r]
        failed |= len(good) < len(records) or any("error" in r for r in records)
        if good:
            append_jsonl(Path(a.out), good)
    if a.report:
        write_report(Path(a.out).parent, Path(a.report))
        print(f"wrote {a.out} and {a.report}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``leanprop bench blpa_memory ARGV`` (``benchmarks/blpa_memory.py``)."""
    from leanprop.bench import script_main

    return script_main(KIND, argv)
