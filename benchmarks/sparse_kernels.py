"""Unstructured sparse kernels against dense ones, per GEMM of a SWAT conv layer (issue 5).

For each 3x3 conv shape of CIFAR ResNet-18 and each sparsity, the three GEMMs of a SWAT training step are
timed both ways on the same tensors:

* forward ``Y = conv(X, W_s)``: oneDNN on the zero-filled weight vs CSR(W_s) @ im2col(X);
* grad-input ``dX = conv_T(G, W_s)``: oneDNN vs col2im(CSR(W_s)^T @ G);
* grad-weight ``dW = conv_w(X_s, G)``: oneDNN vs G @ CSR(im2col(X_s))^T.

The sparse times include what a real sparse path would pay every step: im2col/col2im and the dense -> CSR
conversion (weights change every step, activations every batch). One JSONL record per (layer, op, sparsity)
with ``ratio = sparse / dense`` (below 1: the sparse kernel wins); the report lists the break-even sparsity
per op, which is what an automatic choice would use.

    python benchmarks/sparse_kernels.py                      # batch 32, 1 thread, 80/90/95/98/99 %
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import append_records, run_context, write_report  # noqa: E402

from leanprop.swat.topk import keep_count, magnitude_threshold, sparsify  # noqa: E402

# (Cin, Cout, H) of CIFAR ResNet-18's 3x3 stride-1 convs, one per stage
LAYERS = [(64, 64, 32), (128, 128, 16), (256, 256, 8), (512, 512, 4)]


def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _sparse_of(t: torch.Tensor, s: float) -> torch.Tensor:
    return sparsify(t, magnitude_threshold(t, keep_count(t.numel(), s)))


def measure(cin: int, cout: int, h: int, batch: int, s: float, reps: int) -> dict[str, tuple[float, float]]:
    """``{op: (dense seconds, sparse seconds)}`` for the three GEMMs at sparsity ``s``."""
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(batch, cin, h, h, generator=g))
    w_s = _sparse_of(torch.randn(cout, cin, 3, 3, generator=g), s)
    x_s = _sparse_of(x, s)
    grad = torch.randn(batch, cout, h, h, generator=g)
    w2 = w_s.view(cout, -1)
    out = {}

    def sparse_fwd():
        cols = F.unfold(x, 3, padding=1)  # (N, Cin*9, L)
        csr = w2.to_sparse_csr()
        y = torch.sparse.mm(csr, cols.transpose(0, 1).reshape(cin * 9, -1))
        return y.view(cout, batch, h * h).transpose(0, 1).reshape(batch, cout, h, h)

    out["forward"] = (_time(lambda: F.conv2d(x, w_s, padding=1), reps), _time(sparse_fwd, reps))

    def dense_dx():
        return torch.ops.aten.convolution_backward(grad, x, w_s, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                   [True, False, False])[0]

    def sparse_dx():
        csr_t = w2.t().contiguous().to_sparse_csr()
        cols = torch.sparse.mm(csr_t, grad.transpose(0, 1).reshape(cout, -1))  # (Cin*9, N*L)
        cols = cols.view(cin * 9, batch, h * h).transpose(0, 1)
        return F.fold(cols, (h, h), 3, padding=1)

    out["grad_input"] = (_time(dense_dx, reps), _time(sparse_dx, reps))

    def dense_dw():
        return torch.ops.aten.convolution_backward(grad, x_s, w_s, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                   [False, True, False])[1]

    def sparse_dw():
        cols = F.unfold(x_s, 3, padding=1).transpose(0, 1).reshape(cin * 9, -1)  # (Cin*9, N*L)
        csr = cols.to_sparse_csr()
        gm = grad.transpose(0, 1).reshape(cout, -1)  # (Cout, N*L)
        return torch.sparse.mm(csr, gm.t()).t().view(cout, cin, 3, 3)  # (X_cols @ G^T)^T

    out["grad_weight"] = (_time(dense_dw, reps), _time(sparse_dw, reps))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sparsities", default="0.8,0.9,0.95,0.98,0.99")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparse_kernels.jsonl"))
    ap.add_argument("--report", default=str(ROOT / "docs" / "benchmarks.md"), help="'' to skip the report")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    env, stamp = run_context()
    recs = []
    for cin, cout, h in LAYERS:
        for s in (float(v) for v in a.sparsities.split(",")):
            for op, (dense, sparse) in measure(cin, cout, h, a.batch, s, a.reps).items():
                r = {**env, "bench": "sparse_kernels", "timestamp": stamp, "layer": f"{cin}->{cout}@{h}x{h}",
                     "batch": a.batch, "threads": a.threads, "op": op, "sparsity": s, "dense_ms": dense * 1e3,
                     "sparse_ms": sparse * 1e3, "ratio": sparse / dense}
                recs.append(r)
                print(f"{r['layer']:>18} {op:<12} s={s:.2f} dense {dense * 1e3:7.2f} ms  sparse "
                      f"{sparse * 1e3:7.2f} ms  ratio {sparse / dense:6.2f}", flush=True)
    append_records(Path(a.out), recs)
    if a.report:
        write_report(Path(a.out).parent, Path(a.report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
