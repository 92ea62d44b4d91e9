"""``leanprop bench KIND``: the benchmarks, one module per kind, and ``leanprop report`` (:mod:`.report`).

Every kind module has ``add_parser(kinds)`` (registers ``leanprop bench KIND``; the parsed arguments carry
``bench_run``), ``run(args) -> exit status`` and ``main(argv=None)`` (what the thin scripts in ``benchmarks/``
call). A kind appends JSONL records under ``benchmarks/results/`` (paths relative to the working directory: run
from the repository root); ``leanprop report`` turns them into ``docs/benchmarks.md``. Every timed number goes
through :mod:`leanprop.timing`. Kind modules import only the standard library at module level, so that
``leanprop --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

__all__ = ["KINDS", "kind_modules", "script_main"]

#: the kinds, in the order ``leanprop bench --help`` lists them (each one a module of this package)
KINDS = ("matrix", "memory", "modes", "train_throughput", "swat_speed", "blpa_speed", "kernels", "swat_packing",
         "swat_threshold", "swat_filter_floor", "swat_compile", "blpa_memory", "blpa_grad_error", "accuracy")


def kind_modules() -> tuple[ModuleType, ...]:
    """The modules of :data:`KINDS`."""
    return tuple(importlib.import_module(f"leanprop.bench.{kind}") for kind in KINDS)


def script_main(kind: str, argv: list[str] | None = None, fixed: tuple[str, ...] = ()) -> int:
    """``leanprop bench KIND [FIXED...] ARGV...``; ``argv`` None: this process's arguments, after restarting under
    the allocator ``leanprop bench`` uses (jemalloc, when installed), so that a script times what the command
    times."""
    import argparse

    from leanprop.utils import reexec_under_jemalloc, run_reporting_errors

    if argv is None:
        argv = sys.argv[1:]
        reexec_under_jemalloc([sys.executable, "-m", "leanprop", "bench", kind, *fixed, *argv])
    parser = argparse.ArgumentParser(prog="leanprop bench")
    importlib.import_module(f"leanprop.bench.{kind}").add_parser(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args([kind, *fixed, *argv])
    return run_reporting_errors(f"leanprop bench {kind}", args.bench_run, args)
