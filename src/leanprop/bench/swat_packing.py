"""``leanprop bench swat_packing``: bits per element of SWAT's packed ``X_s`` ("about 4.2 bits/element at 90 %":
measured, not assumed).

For ResNet-18-CIFAR conv-input shapes at batch 128 (post-ReLU activations), each kept density and dtype: the
bytes :func:`leanprop.ops.sparse_storage.pack_above` really keeps (positions -- a 1-bit mask, or int32 indices when
those are smaller -- plus the kept values and the packer's chunk offsets), as bits per element of the dense
tensor, next to the formula ``bits(dtype)·d + 1`` of the mask form; and the pack / unpack time (median ms).
A density at or above the activations' non-zero share (about 50 % after ReLU) is skipped: its Top-K threshold
is 0, and a SWAT layer keeps ``X`` itself then (nothing to drop), not a packed copy.

    leanprop bench swat_packing                        # 2 shapes x 5 densities x fp32/bf16, < 1 min

One JSONL record per (shape, dtype, density) in benchmarks/results/swat_packing.jsonl.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run", "main", "measure", "SHAPES", "DTYPES"]

KIND = "swat_packing"
SHAPES = [(128, 64, 32, 32), (128, 256, 8, 8)]
#: dtype names (torch dtypes looked up when measuring)
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(KIND, help="bits per element and pack/unpack time of SWAT's packed X_s",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--densities", default="0.3,0.2,0.1,0.05,0.01")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES),
                   help="';'-separated N,C,H,W shapes (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/swat_packing.jsonl")
    p.add_argument("--report", default="docs/benchmarks.md", help="'' to skip the report")
    p.set_defaults(bench_run=run)


def _ms(fn, reps: int) -> float:
    """Median milliseconds of ``reps`` calls after one untimed call."""
    from leanprop.timing import time_calls

    return 1e3 * statistics.median(time_calls(fn, reps=reps, warmup=1))


def measure(shape: tuple[int, ...], dtype: Any, density: float, reps: int) -> dict | None:
    """Kept bytes and bits per element of one packed tensor at ``density`` kept, and its pack/unpack times
    (None when the threshold is 0: the layer would keep ``X`` unpacked). ``dtype``: a torch dtype."""
    import torch

    from leanprop.ops.sparse_storage import pack_above, unpack_sparse
    from leanprop.swat.topk import keep_count, magnitude_threshold

    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(shape, generator=g)).to(dtype)
    thr = magnitude_threshold(x, keep_count(x.numel(), 1.0 - density))
    if not float(thr) > 0:
        return None
    positions, values, meta = pack_above(x, thr)
    kept = positions.nbytes + values.nbytes + (0 if meta.offsets is None else meta.offsets.nbytes)
    bits = 8 * kept / x.numel()
    restored = unpack_sparse(positions, values, meta)
    if not torch.equal(restored, torch.where(x.abs() >= thr.to(dtype), x, torch.zeros((), dtype=dtype))):
        raise AssertionError("packed X_s does not restore exactly")  # the benchmark measures a correct packing
    return {"shape": list(shape), "density": density, "kept_bytes": kept, "dense_bytes": x.nbytes,
            "bits_per_element": bits, "formula_bits": torch.finfo(dtype).bits * density + 1,
            "positions": "int32 indices" if meta.indexed else "1-bit mask",
            "values_density": values.numel() / x.numel(),
            "pack_ms": _ms(lambda: pack_above(x, thr), reps),
            "unpack_ms": _ms(lambda: unpack_sparse(positions, values, meta), reps)}


def run(a: argparse.Namespace) -> int:
    import torch

    from leanprop.bench.report import write_report
    from leanprop.utils import append_jsonl, run_context

    dtypes = [d for d in a.dtypes.split(",") if d]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise ValueError(f"--dtypes {a.dtypes!r}: use a comma-separated subset of {','.join(DTYPES)}")
    try:
        shapes = [tuple(int(v) for v in s.split(",")) for s in a.shapes.split(";") if s]
        densities = [float(v) for v in a.densities.split(",") if v]
    except ValueError:
        raise ValueError("--shapes takes N,C,H,W;N,C,H,W and --densities comma-separated fractions") from None
    if any(len(s) != 4 for s in shapes) or any(not 0.0 < d <= 1.0 for d in densities):
        raise ValueError("--shapes needs 4-D shapes and --densities fractions in (0, 1]")
    if a.threads:
        torch.set_num_threads(a.threads)
    env, stamp = run_context()
    recs = []
    for shape in shapes:
        for name in dtypes:
            for d in densities:
                m = measure(shape, getattr(torch, DTYPES[name]), d, a.reps)
                if m is None:
                    print(f"{str(shape):>20} {name} kept {d:5.0%}: skipped (Top-K threshold 0: fewer non-zeros "
                          "than that; the layer keeps X itself)", flush=True)
                    continue
                r = {**env, "bench": "swat_packing", "timestamp": stamp, "dtype": name,
                     "threads": torch.get_num_threads(), **m}
                recs.append(r)
                print(f"{str(shape):>20} {name} kept {d:5.0%}: {r['bits_per_element']:6.3f} bits/element "
                      f"(formula {r['formula_bits']:6.3f}, {r['positions']})  pack {r['pack_ms']:6.2f} ms  "
                      f"unpack {r['unpack_ms']:6.2f} ms", flush=True)
    append_jsonl(Path(a.out), recs)
    if a.report:
        write_report(Path(a.out).parent, Path(a.report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``leanprop bench swat_packing ARGV`` (``benchmarks/swat_packing.py``)."""
    from leanprop.bench import script_main

    return script_main(KIND, argv)
