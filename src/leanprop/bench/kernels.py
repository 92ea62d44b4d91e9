"""``leanprop bench kernels``: unstructured sparse kernels against dense ones, per GEMM of a SWAT conv layer.

For each conv shape of CIFAR ResNet-18 (the 3x3 stride-1 convs of the four stages and the 1x1 stride-2 shortcut
convs) and each sparsity, the three GEMMs of a SWAT training step are
timed dense and in each sparse format S (CSR, COO) on the same tensors:

* forward ``Y = conv(X, W_s)``: oneDNN on the zero-filled weight vs S(W_s) @ im2col(X);
* grad-input ``dX = conv_T(G, W_s)``: oneDNN vs col2im(S(W_s^T) @ G);
* grad-weight ``dW = conv_w(X_s, G)``: oneDNN vs G @ S(im2col(X_s))^T.

The sparse times include what a real sparse path pays every step: im2col/col2im and the dense -> sparse
conversion (weights change every step, activations every batch). Both paths are the library's own
(``leanprop.swat.sparse_kernels.conv_op_pairs``): the ones a SWAT layer's ``sparse_kernels="auto"``
calibration chooses between at the layer's real shapes. One JSONL record per (layer, op, format,
sparsity) with ``ratio = sparse / dense`` (below 1: the sparse kernel wins); the report lists the break-even sparsity
per op, which is what an automatic choice would use.

    leanprop bench kernels                      # batch 32, 1 thread, 80/90/95/98/99 %
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

__all__ = ["add_parser", "run", "main", "measure", "layer_label", "LAYERS"]

KIND = "kernels"
#: the sparse formats timed (``leanprop.swat.sparse_kernels.FORMATS``, written here to keep torch out of --help)
FORMATS = ("csr", "coo")

# (Cin, Cout, input H, kernel, stride) of CIFAR ResNet-18: the 3x3 stride-1 convs, one per stage, and the
# 1x1 stride-2 downsample (shortcut) convs
LAYERS = [(64, 64, 32, 3, 1), (128, 128, 16, 3, 1), (256, 256, 8, 3, 1), (512, 512, 4, 3, 1),
          (64, 128, 32, 1, 2), (128, 256, 16, 1, 2), (256, 512, 8, 1, 2)]


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(KIND, help="sparse (CSR/COO) against dense kernels per GEMM of a SWAT conv layer",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sparsities", default="0.8,0.9,0.95,0.98,0.99")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--formats", default=",".join(FORMATS), help="sparse formats (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results/sparse_kernels.jsonl")
    p.add_argument("--report", default="docs/benchmarks.md", help="'' to skip the report")
    p.set_defaults(bench_run=run)


def layer_label(cin: int, cout: int, h: int, k: int, stride: int) -> str:
    return f"{cin}->{cout}@{h}x{h}" + ("" if (k, stride) == (3, 1) else f" {k}x{k}/s{stride}")


def _time(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls after one untimed call."""
    from leanprop.timing import time_calls

    return statistics.median(time_calls(fn, reps=reps, warmup=1))


def _sparse_of(t, s: float):
    from leanprop.swat.topk import keep_count, magnitude_threshold, sparsify

    return sparsify(t, magnitude_threshold(t, keep_count(t.numel(), s)))


def measure(cin: int, cout: int, h: int, k: int, stride: int, batch: int, s: float, reps: int,
            formats: tuple[str, ...]) -> dict[str, tuple[float, dict[str, float]]]:
    """``{op: (dense seconds, {format: sparse seconds})}`` for the three GEMMs at sparsity ``s``."""
    import torch

    from leanprop.swat.sparse_kernels import conv_op_pairs

    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(batch, cin, h, h, generator=g))
    w_s = _sparse_of(torch.randn(cout, cin, k, k, generator=g), s)
    x_s = _sparse_of(x, s)
    ho = (h + 2 * (k // 2) - k) // stride + 1
    grad = torch.randn(batch, cout, ho, ho, generator=g)
    # the kernels SWAT's layers choose from
    pairs = conv_op_pairs(x, w_s, x_s, grad, (stride,) * 2, (k // 2,) * 2, (1, 1), formats)
    return {op: (_time(dense, reps), {f: _time(fn, reps) for f, fn in sparse.items()})
            for op, (dense, sparse) in pairs.items()}


def run(a: argparse.Namespace) -> int:
    import torch

    from leanprop.bench.report import write_report
    from leanprop.swat.sparse_kernels import FORMATS as KNOWN
    from leanprop.utils import append_jsonl, run_context

    formats = tuple(f for f in a.formats.split(",") if f)
    bad = [f for f in formats if f not in KNOWN]
    if bad or not formats:
        raise ValueError(f"--formats {a.formats!r}: use a comma-separated subset of {','.join(KNOWN)}")
    torch.set_num_threads(a.threads)
    env, stamp = run_context()
    recs = []
    for cin, cout, h, k, stride in LAYERS:
        for s in (float(v) for v in a.sparsities.split(",")):
            label = layer_label(cin, cout, h, k, stride)
            for op, (dense, by_format) in measure(cin, cout, h, k, stride, a.batch, s, a.reps, formats).items():
                for fmt, sparse in by_format.items():
                    r = {**env, "bench": "sparse_kernels", "timestamp": stamp, "layer": label,
                         "batch": a.batch, "threads": a.threads, "op": op, "format": fmt, "sparsity": s,
                         "dense_ms": dense * 1e3, "sparse_ms": sparse * 1e3, "ratio": sparse / dense}
                    recs.append(r)
                    print(f"{r['layer']:>18} {op:<12} {fmt} s={s:.2f} dense {dense * 1e3:7.2f} ms  sparse "
                          f"{sparse * 1e3:7.2f} ms  ratio {sparse / dense:6.2f}", flush=True)
    append_jsonl(Path(a.out), recs)
    if a.report:
        write_report(Path(a.out).parent, Path(a.report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``leanprop bench kernels ARGV`` (``benchmarks/sparse_kernels.py``)."""
    from leanprop.bench import script_main

    return script_main(KIND, argv)
