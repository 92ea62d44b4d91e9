"""``leanprop bench matrix``: every method on every model, measured the same way in one run (docs/benchmarks.md).

Per model, every method is built from the same initial weights and trained on the same random batch:

* **step time**: one training step (forward, cross-entropy, backward, SGD step, the method controller's
  ``step()``) of each method, interleaved round by round in one process, median over the rounds; the ratio to
  the dense step of the *same* run (the machines are shared and noisy);
* **bytes kept for backward** (saved-tensor audit), **peak memory** of one step in a fresh process and, with a
  memory cap, the **largest batch** that fits (:mod:`leanprop.accounting.memory`);
* **kept bytes against batch** (the audit at 1/4, 1/2 and all of the batch), for the memory-vs-batch plot;
* **counted training FLOPs** against dense (conv/linear MACs, :func:`leanprop.accounting.count_flops` from the
  SWAT budgets; BLPA computes what dense computes; per-block checkpointing adds the forward of its blocks).

One JSONL record per (model, method), with the machine, threads, torch version and git sha. Resumable: a model
whose methods all have a record for the same settings and git sha is skipped; otherwise its missing methods are
measured again together with dense (the ratio baseline). ``--quick`` is a smoke version for CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_MODELS", "DEFAULT_METHODS", "add_parser", "run", "measure_model", "done_keys"]

DEFAULT_MODELS = ("resnet20", "cifar_resnet18", "preact_resnet56", "resnet50")
DEFAULT_METHODS = ("dense", "checkpoint", "swat-u90", "swat-u90-packed", "swat-erk90", "swat-filter70",
                   "swat-filter70-p10", "blpa8", "blpa4", "blpa2", "swat-u90+blpa4")
QUICK = {"models": ("resnet20",), "methods": ("dense", "swat-u90", "blpa4", "swat-u90+blpa4"), "batch": 16,
         "imagenet_batch": 2, "rounds": 2, "warmup": 1, "peak": False}
_KEY = ("model", "method", "batch", "threads", "dtype", "channels_last", "compile", "device", "allocator", "git_sha")
_KEY_DEFAULTS = {"compile": False, "allocator": "system"}  # records from before a key existed


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "matrix", help="every method x model: step time, memory kept for backward, peak, FLOPs, max batch",
        description=__doc__.split("\n\n")[0] + " Writes JSONL records; `leanprop report` turns them into "
        "docs/benchmarks.md tables and PNG plots.")
    p.add_argument("--models", "--model", default=",".join(DEFAULT_MODELS),
                   help="comma-separated registry names and/or models of your own: package.module:factory or "
                        "path/to/file.py:factory (called with num_classes and in_channels when it takes them)")
    p.add_argument("--input-shape", metavar="CxHxW",
                   help="per-sample input of every model (default: each model's; a factory's: 3x32x32)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated (see `leanprop bench memory --help`); dense is always measured")
    p.add_argument("--batch", type=int, default=128, help="batch of the CIFAR models (default 128)")
    p.add_argument("--imagenet-batch", type=int, default=8, help="batch of the ImageNet-shape models (default 8)")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per method (interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--threads", type=int, help="torch threads (default: PyTorch's)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="time every method under torch.compile (at least 2 warm-up steps absorb the compilation; "
                        "records carry the graph breaks; `leanprop report` shows compiled / eager step time)")
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N")
    p.add_argument("--malloc-mmap-threshold", metavar="SIZE",
                   help="fix glibc malloc's mmap threshold (e.g. 256KiB) for every method, here and in the memory "
                        "probes (leanprop.allocator); recorded as the allocator, and tabled apart")
    p.add_argument("--mem-cap", help="also find the largest batch under this cap, e.g. 4GiB (fresh processes)")
    p.add_argument("--max-batch-tolerance", type=float, default=0.0, metavar="FRACTION",
                   help="relative resolution of the --mem-cap search (default 0: exact; 0.02: within 2 %%)")
    p.add_argument("--no-peak", dest="peak", action="store_false", help="skip the fresh-process peak probes")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (resnet20 unless --models is given, 4 methods, batch 16, 2 rounds, no peak "
                        "probes; ~1 minute)")
    p.add_argument("--force", action="store_true", help="measure again what the JSONL already holds")
    p.add_argument("--out", default="benchmarks/results/matrix.jsonl", help="JSONL file records are appended to")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto")
    p.set_defaults(bench_run=run)


#: suffix of the eager step times ``step_times(compile=True)`` returns beside the compiled ones
EAGER = "@eager"


def step_times(base: dict[str, Any], methods: list[str], batch: int, rounds: int, warmup: int,
               note=lambda s: None, kernels: dict[str, dict] | None = None,
               compile: bool = False) -> dict[str, list[float]]:
    """Seconds of each method's training steps (:func:`leanprop.timing.training_step`), interleaved round by
    round (:func:`leanprop.timing.interleaved`; one model per method).

    A method whose controller :attr:`~leanprop.methods.Controller.needs_prepare` prepares on this batch first, as
    training does (e.g. SWAT's ``sparse_kernels="auto"`` times its kernels); ``kernels``, when given, receives
    for each method with something to say the controller's :meth:`~leanprop.methods.Controller.notes` (SWAT:
    ``sparse_kernels``, the one-line kernel choice) and ``kernel_calibration_s`` (seconds the preparation took,
    only when it ran here). ``compile``: each model runs under ``torch.compile``; ``kernels`` then also receives
    per method ``compile_s`` (the first, compiling step) and the graph breaks, graphs and recompile-limit hits of
    its steps (:class:`leanprop.modes.CompileStats`), and every model also steps eagerly, interleaved with its
    compiled steps: those times are returned under ``method + EAGER``."""
    import torch

    from leanprop.accounting.memory import build_model, make_batch, normalize_spec
    from leanprop.modes import CompileStats
    from leanprop.ops.autocast import autocast_context
    from leanprop.timing import device_sync, interleaved, time_calls, training_step

    built = {}
    for m in methods:
        spec = normalize_spec({**base, "method": m})
        model, handle = build_model(spec)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        handle.attach_optimizer(opt)
        built[m] = (model, handle, opt, spec)
    x, y = make_batch(built[methods[0]][3], batch)
    for m in methods:
        _, handle, _, spec = built[m]
        info: dict[str, Any] = {}
        if handle.needs_prepare:
            note(f"prepare {m}")
            with autocast_context(spec["device"], spec["dtype"]):
                seconds = time_calls(lambda h=handle, m=m: h.prepare(x, progress=lambda s: note(f"prepare {m}: {s}")),
                                     reps=1)[0]
            info["kernel_calibration_s"] = round(seconds, 3)
        facts = {**handle.notes(), **info}
        if kernels is not None and facts:
            kernels[m] = facts
    order = list(methods)
    if compile:  # the same model also steps eagerly, interleaved: compiled / eager comes from one run
        eager = {m + EAGER: entry for m, entry in built.items()}
        built = {m: (torch.compile(model), handle, opt, spec) for m, (model, handle, opt, spec) in built.items()}
        built.update(eager)
        order = [k for m in methods for k in (m + EAGER, m)]
    stats = {m: CompileStats() for m in order}
    calls = {}
    for m in order:
        model, handle, opt, spec = built[m]
        step = training_step(model, handle, opt, x, y,
                             autocast=lambda spec=spec: autocast_context(spec["device"], spec["dtype"]))
        calls[m] = _within(stats[m], step) if compile else step
    limits = contextlib.nullcontext()
    if compile:  # the methods' models share code objects (e.g. ResNet.forward): a cache entry per model and variant
        import torch._dynamo

        torch._dynamo.reset()
        n = 8 * len(methods)
        limits = torch._dynamo.config.patch(recompile_limit=n, accumulated_recompile_limit=max(256, 16 * n))
    with limits:  # warm-up rounds timed too: the first compiled step is the compile time
        times = interleaved(calls, rounds=warmup + rounds, sync=device_sync(x.device), progress=note)
    if compile and kernels is not None:
        for m in methods:
            if warmup:
                kernels.setdefault(m, {})["compile_s"] = round(times[m][0], 1)
            kernels.setdefault(m, {}).update(stats[m].as_dict(max_reasons=3))
    return {m: ts[warmup:] for m, ts in times.items()}


def _within(context: contextlib.AbstractContextManager, fn):
    """``fn`` called inside ``context`` (entered anew for every call)."""

    def call():
        with context:
            return fn()

    return call


def flops_ratio(base: dict[str, Any], method: str) -> tuple[float | None, str]:
    """(counted training FLOPs of ``method`` / dense, how they were counted) for conv/linear MACs: the method's
    controller counts them on its converted model (:meth:`leanprop.methods.Controller.training_flops`)."""
    from leanprop.accounting.memory import build_model, normalize_spec

    spec = normalize_spec({**base, "method": method})
    model, handle = build_model(spec)
    return handle.training_flops(model, (1, *spec["input_shape"]))


def measure_model(model: str, methods: list[str], batch: int, a: argparse.Namespace, bar=None) -> list[dict]:
    """The records of one model: memory (and peak / max batch), step times and FLOPs of every method."""
    import torch

    from leanprop.accounting.memory import parse_size
    from leanprop.bench.memory import default_model_kwargs, measure_methods, model_name_family, parse_input_shape
    from leanprop.utils import run_context

    def note(s: str) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{model}: {s}")

    if a.threads:
        torch.set_num_threads(a.threads)
    base = {"model": model, "model_kwargs": default_model_kwargs(model, {}), "threads": a.threads,
            "device": a.device, "dtype": a.dtype, "channels_last": a.channels_last,
            "input_shape": parse_input_shape(getattr(a, "input_shape", None))}
    cap = parse_size(a.mem_cap) if a.mem_cap else None
    note("memory")
    records = measure_methods(base, methods, batch, peak=a.peak, mem_cap=cap, progress=False,
                              tolerance=a.max_batch_tolerance)
    note("step times")
    kernels: dict[str, dict] = {}
    compile = bool(getattr(a, "compile", False))
    times = step_times(base, methods, batch, a.rounds, max(a.warmup, 2) if compile else a.warmup, note, kernels,
                       compile=compile)
    env, stamp = run_context(a.device)
    dense_s = statistics.median(times["dense"])
    family = model_name_family(model)[1]
    for rec in records:
        m = rec["method"]
        if bar is not None:
            bar.update(1)
        med = statistics.median(times[m])
        rec.update(env)
        rec.update(bench="matrix", family=family, timestamp=stamp, rounds=a.rounds,
                   warmup=max(a.warmup, 2) if compile else a.warmup, compile=compile,
                   step_s=med, step_s_all=times[m], dense_step_s=dense_s, time_vs_dense=med / dense_s,
                   throughput_vs_dense=dense_s / med, images_per_s=batch / med)
        rec.update(kernels.get(m, {}))
        if compile:  # the same model's eager steps, interleaved with the compiled ones in this run
            eager_s = statistics.median(times[m + EAGER])
            rec.update(eager_step_s=eager_s, eager_step_s_all=times[m + EAGER], time_vs_eager=med / eager_s)
        note(f"FLOPs {m}")
        try:
            rec["train_flops_vs_dense"], rec["flops_note"] = flops_ratio(base, m)
        except Exception as e:  # noqa: BLE001 -- a FLOP-counting failure must not lose the measurements
            rec["train_flops_vs_dense"], rec["flops_note"] = None, f"not counted: {e}"
        note(f"kept vs batch {m}")
        rec["kept_vs_batch"] = _kept_vs_batch({**base, "method": m}, batch, rec.get("saved_bytes"))
    return records


def _kept_vs_batch(spec: dict[str, Any], batch: int, full: int | None) -> list[list[int]]:
    """``[[batch, kept bytes], ...]`` at 1/4, 1/2 and the whole batch (the last from the main audit)."""
    from leanprop.bench.memory import audit_saved

    points = [[b, audit_saved(spec, b).total_bytes]
              for b in sorted({max(1, batch // 4), max(1, batch // 2)} - {batch})]
    if full is not None:
        points.append([batch, full])
    return points


def done_keys(path: Path) -> set[tuple]:
    """Keys (model, method, batch, threads, dtype, layout, device, git sha) already in the JSONL."""
    if not path.exists():
        return set()
    keys = set()
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e}); fix or delete that line") from e
        if r.get("bench") == "matrix" and "step_s" in r:
            keys.add(tuple(str(r.get(k, _KEY_DEFAULTS.get(k))) for k in _KEY))
    return keys


def _key(model: str, method: str, batch: int, a: argparse.Namespace, threads: int, sha: str | None) -> tuple:
    from leanprop import allocator

    return tuple(str(v) for v in (model, method, batch, threads, a.dtype, a.channels_last,
                                  bool(getattr(a, "compile", False)), a.device, allocator.describe(), sha))


def run(a: argparse.Namespace) -> int:
    """Measure the matrix, appending one record per (model, method) to ``--out`` after each model."""
    import torch
    from tqdm import tqdm

    from leanprop.bench.memory import model_name_family, parse_input_shape
    from leanprop.methods import parse_method
    from leanprop.utils import append_jsonl, run_context

    if a.quick:
        for k, v in QUICK.items():
            if k == "models" and a.models != ",".join(DEFAULT_MODELS):
                continue  # --quick on the models given (e.g. --model package.module:factory)
            setattr(a, k, ",".join(v) if isinstance(v, tuple) else v)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    methods = [m.strip().lower() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        parse_method(m)  # a ValueError naming the accepted forms
    families = dict(model_name_family(name) for name in models)  # ValueError: unknown name, or a factory's problem
    models = list(families)
    parse_input_shape(getattr(a, "input_shape", None))
    if "dense" in methods:
        methods.remove("dense")
    methods = ["dense", *methods]
    if a.rounds < 1 or a.warmup < 0:
        raise ValueError("--rounds must be >= 1 and --warmup >= 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    if getattr(a, "malloc_mmap_threshold", None) is not None:
        from leanprop import allocator
        from leanprop.accounting.memory import parse_size

        allocator.set_mmap_threshold(allocator.check_mmap_threshold(parse_size(a.malloc_mmap_threshold)))
    threads = a.threads or torch.get_num_threads()
    sha = run_context(a.device)[0].get("git_sha")
    out = Path(a.out)
    have = set() if a.force else done_keys(out)
    plan = []
    for name in models:
        batch = a.imagenet_batch if families[name] == "imagenet" else a.batch
        missing = [m for m in methods if _key(name, m, batch, a, threads, sha) not in have]
        if missing:
            plan.append((name, batch, ["dense", *[m for m in missing if m != "dense"]]))
        else:
            print(f"{name}: every method already measured in {out} (use --force to measure again)")
    show = {"on": True, "off": False}.get(a.progress, sys.stderr.isatty())
    bar = tqdm(total=sum(len(p[2]) for p in plan), desc="bench matrix", unit="method", disable=not show,
               file=sys.stderr)
    failed = False
    for name, batch, ms in plan:
        records = measure_model(name, ms, batch, a, bar)
        append_jsonl(out, records)
        failed |= any("error" in r for r in records)
        print(_summary(name, batch, records), flush=True)
    bar.close()
    print(f"records in {out}; `leanprop report` writes docs/benchmarks.md and the plots")
    return 1 if failed else 0


def _summary(model: str, batch: int, records: list[dict]) -> str:
    from leanprop.accounting.memory import format_bytes

    w = max(12, *(len(r["method"]) for r in records))
    lines = [f"{model}, batch {batch}",
             f"{'method':<{w}} {'step ms':>9} {'x dense':>8} {'kept':>11} {'x dense':>8} {'FLOPs x':>8}"]
    for r in records:
        kept = r.get("ratio_vs_dense")
        fl = r.get("train_flops_vs_dense")
        lines.append(f"{r['method']:<{w}} {r['step_s'] * 1000:>9.1f} {r['time_vs_dense']:>8.3f} "
                     f"{format_bytes(r.get('saved_bytes')):>11} {'-' if kept is None else f'{kept:.3f}':>8} "
                     f"{'-' if fl is None else f'{fl:.3f}':>8}" + (f"  error: {r['error']}" if "error" in r else ""))
    return "\n".join(lines)
