"""``leanprop bench memory``: bytes kept for backward, peak memory of one step and the largest batch, per method.

    leanprop bench memory --model preact_resnet164 --batch 128 --method blpa4
    leanprop bench memory --model preact_resnet56 --method dense,checkpoint --mem-cap 4GiB --jsonl mem.jsonl
    leanprop bench memory --model mypackage.models:make_net --input-shape 3x64x64 --method dense,blpa4

For each method the same model (same seed, same ``--model-arg`` options) is measured three ways
(:mod:`leanprop.accounting.memory`): the saved-tensor audit of one forward pass in this process, the peak of one
training step in a fresh process, and, with ``--mem-cap``, the largest batch whose fresh-process peak fits.

Only ``argparse`` is imported at module level so that ``leanprop --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

__all__ = ["add_parser", "run", "measure_methods", "format_table", "parse_methods", "parse_model_args",
           "parse_input_shape", "default_model_kwargs", "model_name_family"]

_DEFAULT_METHODS = ("dense", "checkpoint", "blpa8", "blpa4", "blpa2")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``memory`` bench kind on ``subparsers`` (the sub-parsers of ``leanprop bench``)."""
    m = subparsers.add_parser(
        "memory", help="bytes kept for backward, peak memory and max batch per method",
        description="Measure, per method, the bytes kept for backward by one training-mode forward pass "
                    "(saved-tensor audit, deduplicated by storage, parameters excluded), the peak memory of one "
                    "training step in a fresh process (peak RSS on CPU, max allocated on CUDA) and, with "
                    "--mem-cap, the largest batch that fits. Every method runs on the same model; preact_* "
                    "models default to shortcut=pad (the BLPA architecture; override with --model-arg "
                    "shortcut=projection).")
    m.add_argument("--model", required=True,
                   help="registry name (see `leanprop models`), or a model of your own: package.module:factory or "
                        "path/to/file.py:factory (called with num_classes and in_channels when it takes them)")
    m.add_argument("--batch", type=int, help="batch size (default: 128 for CIFAR models, 32 for ImageNet ones)")
    m.add_argument("--method", action="append", metavar="M[,M...]",
                   help="dense, checkpoint (torch.utils.checkpoint per residual block), blpaK (K = 8, 4, 2, 32) or "
                        "swat-<u|erk|m|channel|filter><percent>[-packed] (swat-u90, swat-u90-packed: X_s/W_s "
                        "stored compressed, 1-bit ReLU masks) or swat-...+blpaK (both on one model); "
                        "repeatable or comma-separated (default: " + ",".join(_DEFAULT_METHODS) + ")")
    m.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="model option, e.g. shortcut=pad (repeatable; VALUE parsed as YAML). preact_* models "
                        "default to shortcut=pad")
    m.add_argument("--input-size", "--input-shape", dest="input_size",
                   help="per-sample input: S (3xSxS) or CxHxW (default: the model's, e.g. 3x32x32; a factory's: "
                        "3x32x32)")
    m.add_argument("--num-classes", type=int, help="classes of the classifier (default: the model's)")
    m.add_argument("--threads", type=int, help="torch intra-op threads, here and in the probes (default: torch's)")
    m.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N | auto")
    m.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32 (default), or bf16/fp16 under autocast")
    m.add_argument("--channels-last", action="store_true", help="NHWC model and input")
    m.add_argument("--mem-cap", metavar="SIZE",
                   help="find the largest batch whose one-step peak fits SIZE (e.g. 512MiB, 4GiB, 1.5GB): "
                        "doubling then binary search, one fresh process per probe")
    m.add_argument("--max-batch-limit", type=int, default=1 << 16,
                   help="upper bound of the --mem-cap search (default: 65536)")
    m.add_argument("--max-batch-tolerance", type=float, default=0.0, metavar="FRACTION",
                   help="stop the --mem-cap search once the first failing batch is within this fraction of the "
                        "largest fitting one (e.g. 0.02: fewer probes of the slowest batches; default 0: exact)")
    m.add_argument("--no-peak", dest="peak", action="store_false",
                   help="skip the fresh-process peak measurement (saved bytes only)")
    m.add_argument("--probe-timeout", type=float, default=600.0,
                   help="seconds before a probe process is killed (default: 600)")
    m.add_argument("--malloc-mmap-threshold", metavar="SIZE",
                   help="fix glibc malloc's mmap threshold (e.g. 256KiB) here and in the probes, for every method: "
                        "freed activations then leave the resident set at once (see leanprop.allocator); "
                        "recorded as the allocator")
    m.add_argument("--jsonl", metavar="PATH", help="append one JSON record per method (with the machine context)")
    m.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress bar over methods on stderr (auto: only on a TTY)")
    m.set_defaults(bench_run=run)
    return m


# --------------------------------------------------------------------------------------------------------
# argument parsing


def parse_methods(items: list[str] | None) -> list[str]:
    """Methods from repeated and/or comma-separated ``--method`` values (default: all five), validated, in order,
    without repeats."""
    from leanprop.methods import parse_method

    if not items:
        return list(_DEFAULT_METHODS)
    out: list[str] = []
    for item in items:
        for name in item.split(","):
            name = name.strip().lower()
            if not name:
                continue
            parse_method(name)
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError("--method: no method given")
    return out


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``["shortcut=pad", "width=2"]`` -> ``{"shortcut": "pad", "width": 2}`` (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def default_model_kwargs(model: str, given: dict[str, Any]) -> dict[str, Any]:
    """The model options used for every method: ``shortcut="pad"`` for ``preact_*`` models unless given."""
    kwargs = dict(given)
    if model.startswith("preact_"):
        kwargs.setdefault("shortcut", "pad")
    return kwargs


def model_name_family(model: str) -> tuple[str, str]:
    """``(name, family)`` of ``--model``: a registry name and its family (``cifar``/``imagenet``), or a factory of
    one's own (``package.module:factory``, ``path/to/file.py:factory``; checked to import) and ``"custom"``."""
    from leanprop import models
    from leanprop.accounting.memory import FACTORY_FORMS, is_factory_ref, resolve_factory

    if is_factory_ref(model):
        return resolve_factory(model)[0], "custom"
    try:
        info = models.model_info(model)
    except ValueError as e:
        raise ValueError(f"{e} (a model of your own: {FACTORY_FORMS})") from None
    return info.name, info.family


def parse_input_shape(text: str | None) -> list[int] | None:
    """``"32"`` -> ``[3, 32, 32]``; ``"3x64x64"`` / ``"3,64,64"`` -> ``[3, 64, 64]``; None stays None."""
    if text is None:
        return None
    parts = [p for p in text.lower().replace(",", "x").split("x") if p.strip()]
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) == 1:
        dims = [3, dims[0], dims[0]]
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"bad --input-size {text!r}: use S (square, 3 channels) or CxHxW, e.g. 32 or 3x32x32")
    return dims


# --------------------------------------------------------------------------------------------------------
# measuring


def audit_saved(spec: dict[str, Any], batch: int):
    """The saved-tensor audit (:func:`leanprop.accounting.memory.saved_bytes`) of one training forward of the
    spec's model and method at ``batch``, with the cross-entropy loss of random targets."""
    import torch.nn.functional as F

    from leanprop.accounting.memory import build_model, make_batch, normalize_spec, saved_bytes
    from leanprop.ops.autocast import autocast_context

    spec = normalize_spec(spec)
    model, _ = build_model(spec)
    x, y = make_batch(spec, batch)
    with autocast_context(spec["device"], spec["dtype"]):
        return saved_bytes(model, x, lambda out: F.cross_entropy(out.float(), y), model_name=spec["model"])


def _measure_one(spec: dict[str, Any], batch: int, peak: bool, mem_cap: int | None, limit: int,
                 timeout: float | None, note: Any, tolerance: float = 0.0) -> dict[str, Any]:
    import torch

    from leanprop.accounting.memory import max_batch, peak_memory

    rec: dict[str, Any] = {}
    note("saved bytes")
    rep = audit_saved(spec, batch)
    rec.update(saved_bytes=rep.total_bytes, saved_raw_bytes=rep.raw_bytes, saved_tensors=rep.num_saved,
               saved_storages=rep.num_unique, saved_by_kind=rep.by_kind, saved_by_origin=rep.by_origin,
               saved_via=rep.via, saved_codec=rep.codec,
               saved_bytes_per_sample=rep.bytes_per_sample, parameter_bytes=rep.parameter_bytes)
    if peak:
        note("peak (fresh process)")
        p = peak_memory(spec, batch, timeout=timeout)
        rec["peak"] = p
        if not p.get("ok"):
            rec["error"] = f"peak memory probe failed: {p.get('error')}"
        for key in ("peak_bytes", "step_peak_growth_bytes", "rss_before_bytes", "step_peak_rss_bytes",
                    "ru_maxrss_bytes", "max_allocated_bytes", "alloc_before_bytes"):
            if p.get(key) is not None:
                rec[key] = p[key]
    if mem_cap is not None:
        note("max batch")
        # first guess: the cap spent on the audited kept bytes plus as much again (weights, gradients, workspace)
        guess = max(1, min(limit, int(mem_cap / (2 * max(rep.bytes_per_sample, 1.0)))))
        res = max_batch(spec, mem_cap, start=guess, limit=limit, timeout=timeout, tolerance=tolerance,
                        on_probe=lambda r: note(f"max batch: {r['batch']} {'fits' if r['fits'] else 'too big'}"))
        rec.update(mem_cap_bytes=mem_cap, max_batch=res.batch, max_batch_fails=res.fails,
                   max_batch_tolerance=tolerance, max_batch_hit_limit=res.hit_limit, max_batch_probes=res.probes)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rec


def measure_methods(base_spec: dict[str, Any], methods: list[str], batch: int, *, peak: bool = True,
                    mem_cap: int | None = None, limit: int = 1 << 16, timeout: float | None = 600.0,
                    progress: bool = False, context: bool = True, tolerance: float = 0.0) -> list[dict[str, Any]]:
    """One record per method (see :func:`run`); a method that fails gets an ``error`` entry and the others go on
    (``LEANPROP_DEBUG=1`` re-raises).  ``ratio_vs_dense`` / ``peak_growth_ratio_vs_dense`` compare with the dense
    record of the same call, when there is one."""
    import torch
    from tqdm import tqdm

    from leanprop.accounting.memory import normalize_spec
    from leanprop.utils import run_context

    if base_spec.get("threads"):
        torch.set_num_threads(int(base_spec["threads"]))
    specs = [normalize_spec({**base_spec, "method": m}) for m in methods]
    env, stamp = run_context(specs[0]["device"]) if context else ({}, None)
    records = []
    bar = tqdm(specs, desc="bench memory", unit="method", disable=not progress, file=sys.stderr, leave=False)
    for spec in bar:
        rec: dict[str, Any] = {**env, "bench": "memory", **spec, "batch": batch,
                               "threads": spec["threads"] or torch.get_num_threads()}
        if stamp:
            rec["timestamp"] = stamp

        def note(what: str, _m: str = spec["method"]) -> None:
            bar.set_postfix_str(f"{_m}: {what}")

        try:
            rec.update(_measure_one(spec, batch, peak, mem_cap, limit, timeout, note, tolerance))
        except Exception as e:  # noqa: BLE001 -- one broken method must not hide the others' numbers
            if os.environ.get("LEANPROP_DEBUG"):
                raise
            rec["error"] = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
        records.append(rec)
    bar.close()
    dense = next((r for r in records if r["method"] == "dense" and "saved_bytes" in r), None)
    for r in records:
        if dense is not None and "saved_bytes" in r and dense["saved_bytes"]:
            r["ratio_vs_dense"] = r["saved_bytes"] / dense["saved_bytes"]
        if dense is not None and r.get("step_peak_growth_bytes") and dense.get("step_peak_growth_bytes"):
            r["peak_growth_ratio_vs_dense"] = r["step_peak_growth_bytes"] / dense["step_peak_growth_bytes"]
    return records


def format_table(records: list[dict[str, Any]]) -> str:
    """The per-method table, then the per-kind breakdown and errors."""
    from leanprop.accounting.memory import format_bytes

    cuda = any(str(r.get("device", "")).startswith("cuda") for r in records)
    peak_name = "peak alloc" if cuda else "peak RSS"
    w = max([11, *(len(str(r["method"])) for r in records)])
    head = (f"{'method':<{w}} {'kept':>11} {'vs dense':>9} {'per sample':>11} {'tensors':>8} {peak_name:>11} "
            f"{'step growth':>12} {'vs dense':>9} {'max batch':>10}")
    lines = [head]
    for r in records:
        ratio = f"{r['ratio_vs_dense']:.3f}" if r.get("ratio_vs_dense") is not None else "-"
        pratio = f"{r['peak_growth_ratio_vs_dense']:.3f}" if r.get("peak_growth_ratio_vs_dense") is not None else "-"
        mb = "-" if r.get("max_batch") is None else str(r["max_batch"]) + ("+" if r.get("max_batch_hit_limit") else "")
        if "saved_bytes" not in r:
            lines.append(f"{r['method']:<{w}} error: {r.get('error')}")
            continue
        lines.append(f"{r['method']:<{w}} {format_bytes(r['saved_bytes']):>11} {ratio:>9} "
                     f"{format_bytes(r['saved_bytes_per_sample']):>11} {r['saved_tensors']:>8} "
                     f"{format_bytes(r.get('peak_bytes')):>11} {format_bytes(r.get('step_peak_growth_bytes')):>12} "
                     f"{pratio:>9} {mb:>10}")
    for r in records:
        if "saved_by_kind" in r:
            kinds = ", ".join(f"{k} {format_bytes(v)}" + (" (not counted)" if k == "parameter" else "")
                              for k, v in r["saved_by_kind"].items())
            lines.append(f"  {r['method']}: {kinds or 'nothing saved'} (via {r['saved_via']})")
    for r in records:
        if r.get("error") and "saved_bytes" in r:
            lines.append(f"  {r['method']}: error: {r['error']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``leanprop bench memory``: prints the table, appends to ``--jsonl``. 0 if every method measured, 1 if
    some failed (their errors are printed), 2 on bad arguments (via the CLI's error handler)."""
    from leanprop.accounting.memory import build_model, normalize_spec, parse_size
    from leanprop.utils import append_jsonl

    name, family = model_name_family(args.model)
    methods = parse_methods(args.method)
    kwargs = default_model_kwargs(name, parse_model_args(args.model_arg))
    shape = parse_input_shape(args.input_size)
    cap = parse_size(args.mem_cap) if args.mem_cap is not None else None
    batch = args.batch if args.batch is not None else (128 if family in ("cifar", "custom") else 32)
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if args.max_batch_limit < 1:
        raise ValueError(f"--max-batch-limit must be >= 1, got {args.max_batch_limit}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    base = normalize_spec({"model": name, "model_kwargs": kwargs, "input_shape": shape,
                           "num_classes": args.num_classes, "device": args.device, "threads": args.threads,
                           "dtype": args.dtype, "channels_last": args.channels_last})
    build_model({**base, "device": "cpu", "channels_last": False})  # bad --model-arg or factory: fail before measuring
    base.pop("method")
    progress = {"on": True, "off": False}.get(args.progress, sys.stderr.isatty())
    if not 0 <= args.max_batch_tolerance < 1:
        raise ValueError(f"--max-batch-tolerance must be in [0, 1), got {args.max_batch_tolerance}")
    if args.malloc_mmap_threshold is not None:
        from leanprop import allocator

        allocator.set_mmap_threshold(allocator.check_mmap_threshold(parse_size(args.malloc_mmap_threshold)))
    records = measure_methods(base, methods, batch, peak=args.peak, mem_cap=cap, limit=args.max_batch_limit,
                              timeout=args.probe_timeout, progress=progress, tolerance=args.max_batch_tolerance)
    r0 = records[0]
    opts = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    shown = base["model"]
    print(f"{shown}{f' ({opts})' if opts else ''}, batch {batch}, input {'x'.join(map(str, r0['input_shape']))}, "
          f"{r0['device']}, {r0['dtype']}, {r0['threads']} threads, allocator {r0.get('allocator', '?')}"
          + (f", memory cap {args.mem_cap}" if cap else ""))
    print(format_table(records))
    good = [r for r in records if "saved_bytes" in r]
    if args.jsonl and good:
        append_jsonl(args.jsonl, good)
        print(f"appended {len(good)} record(s) to {args.jsonl}")
    return 0 if all("error" not in r for r in records) else 1
