"""``leanprop bench swat_threshold``: SWAT Top-K threshold and masking costs on CPU, against the conv forward of
the same layer.

For each tensor (ResNet-18-CIFAR shapes at batch 128, keep 10 %) and thread count, times in interleaved rounds
(median over rounds):

- conv_forward: the layer's dense ``F.conv2d`` forward (the yardstick; ratios in the table are to it)
- topk / kthvalue: ``|t|`` then a plain ``torch.topk`` / ``torch.kthvalue`` on the flat tensor (the official way)
- exact_select: ``leanprop.swat.topk.magnitude_threshold`` (exact, sample-bracketed selection)
- sample_16k / sample_1pct: the approximate sampled estimator with 16384 samples / 1 % of the tensor
- sparsify_*: the mask pass ``t where |t| >= thr else 0``: ``sparsify`` (fused hardshrink), ``torch.where``,
  ``t * mask``, and the device-side tensor-threshold path that ``sparsify`` uses on accelerators

    leanprop bench swat_threshold                  # ~2 min on 2 cores
    leanprop bench swat_threshold --rounds 5 --threads 1

Each (tensor, op, threads) is one JSONL record in benchmarks/results/swat_threshold.jsonl. Run every variant under
the same allocator (``leanprop bench`` restarts itself under jemalloc when it is installed); the record says
which.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run", "main", "bench", "make_ops", "check", "print_table", "TENSORS"]

KIND = "swat_threshold"

# (name, tensor shape, conv input shape, conv weight shape): the tensor is thresholded; the conv is its layer.
TENSORS = [
    ("layer1_activation", (128, 64, 32, 32), (128, 64, 32, 32), (64, 64, 3, 3)),
    ("layer2_activation", (128, 128, 16, 16), (128, 128, 16, 16), (128, 128, 3, 3)),
    ("layer4_weight", (512, 512, 3, 3), (128, 512, 4, 4), (512, 512, 3, 3)),
]


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(KIND, help="SWAT Top-K threshold and masking costs against the layer's conv forward",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--keep", type=float, default=0.1, help="kept fraction (1 - sparsity)")
    p.add_argument("--tensors", nargs="+", default=None, choices=[t[0] for t in TENSORS])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/swat_threshold.jsonl"))
    p.add_argument("--no-save", action="store_true")
    p.set_defaults(bench_run=run)


def make_ops(t: Any, x: Any, w: Any, keep: int) -> dict:
    import torch
    import torch.nn.functional as F

    from leanprop.ops.sparsify import _largest_below
    from leanprop.swat import topk

    n = t.numel()
    thr = topk.magnitude_threshold(t, keep)
    thr_f = float(thr)
    gen = torch.Generator().manual_seed(0)
    return {
        "conv_forward": lambda: F.conv2d(x, w, padding=1),
        "topk": lambda: torch.topk(t.abs().flatten(), keep).values[-1],
        "kthvalue": lambda: torch.kthvalue(t.abs().flatten(), n - keep + 1).values,
        "exact_select": lambda: topk.magnitude_threshold(t, keep),
        "sample_16k": lambda: topk.magnitude_threshold(t, keep, estimator="sample", sample_size=16384, generator=gen),
        "sample_1pct": lambda: topk.magnitude_threshold(t, keep, estimator="sample", sample_size=n // 100,
                                                        generator=gen),
        "sparsify_hardshrink": lambda: topk.sparsify(t, thr_f),
        "sparsify_where": lambda: torch.where(t.abs() >= thr, t, 0.0),
        "sparsify_mul_mask": lambda: t * (t.abs() >= thr),
        "sparsify_tensor_path": lambda: torch.where(t.abs() > _largest_below(thr, t.dtype), t, 0.0),
    }


def check(t: Any, keep: int) -> None:
    import torch

    from leanprop.swat import topk

    got = topk.magnitude_threshold(t, keep)
    ref = torch.topk(t.abs().flatten().float(), keep).values[-1]
    if not torch.equal(got, ref):
        raise AssertionError(f"exact_select {got.item()} != topk {ref.item()}")
    thr = float(got)
    a = topk.sparsify(t, thr)
    if not torch.equal(a, torch.where(t.abs() >= thr, t, 0.0)):
        raise AssertionError("sparsify differs from torch.where")


def bench(threads: int, rounds: int, warmup: int, keep_fraction: float, names: list[str] | None) -> list[dict]:
    import torch

    from leanprop.swat import topk
    from leanprop.timing import interleaved
    from leanprop.utils import run_context

    torch.set_num_threads(threads)
    env, stamp = run_context()
    records = []
    for name, shape, x_shape, w_shape in TENSORS:
        if names and name not in names:
            continue
        gen = torch.Generator().manual_seed(0)
        t = torch.randn(shape, generator=gen)
        x = t if tuple(x_shape) == tuple(shape) else torch.randn(x_shape, generator=gen)
        w = t if tuple(w_shape) == tuple(shape) else torch.randn(w_shape, generator=gen) * 0.05
        keep = topk.keep_count(t.numel(), 1.0 - keep_fraction)
        check(t, keep)
        ops = make_ops(t, x, w, keep)
        times = {op: [s * 1e3 for s in ts]  # interleaved: every op once per round
                 for op, ts in interleaved(ops, rounds=rounds, warmup=warmup).items()}
        conv_ms = statistics.median(times["conv_forward"])
        for op, ts in times.items():
            ms = statistics.median(ts)
            records.append({
                "bench": "swat_threshold", "time": stamp, "tensor": name, "shape": list(shape), "numel": t.numel(),
                "keep_fraction": keep_fraction, "op": op, "threads": threads, "ms": round(ms, 3),
                "ms_min": round(min(ts), 3), "rounds": rounds, "ratio_to_conv": round(ms / conv_ms, 4), **env,
            })
    return records


def print_table(records: list[dict]) -> None:
    by = {}
    for r in records:
        by.setdefault((r["tensor"], r["threads"]), {})[r["op"]] = r
    ops = list(next(iter(by.values())).keys())
    print(f"{'tensor':20s} {'thr':>3s} " + " ".join(f"{op:>22s}" for op in ops))
    for (tensor, threads), row in by.items():
        cells = [f"{row[op]['ms']:8.2f}ms {100 * row[op]['ratio_to_conv']:6.1f}%" for op in ops]
        print(f"{tensor:20s} {threads:3d} " + " ".join(f"{c:>22s}" for c in cells))
    print("(median ms and % of the layer's conv forward)")
    for (tensor, threads), row in by.items():
        speedup = row["kthvalue"]["ms"] / row["exact_select"]["ms"]
        print(f"  {tensor} {threads} thread(s): exact_select is {speedup:.1f}x faster than kthvalue, "
              f"{row['topk']['ms'] / row['exact_select']['ms']:.1f}x faster than topk")


def run(a: argparse.Namespace) -> int:
    from leanprop.utils import append_jsonl

    if not 0 < a.keep <= 1 or math.isnan(a.keep):
        raise ValueError("--keep must be in (0, 1]")
    records = []
    for threads in a.threads:
        records += bench(threads, a.rounds, a.warmup, a.keep, a.tensors)
    print_table(records)
    if not a.no_save:
        append_jsonl(a.out, records)
        print(f"appended {len(records)} records to {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``leanprop bench swat_threshold ARGV`` (``benchmarks/swat_threshold.py``)."""
    from leanprop.bench import script_main

    return script_main(KIND, argv)
