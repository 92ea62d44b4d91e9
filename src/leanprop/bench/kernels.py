"""``leanprop bench kernels``: the sparse kernels of a SWAT conv layer against oneDNN and SparseProp, per layer.

For each conv of CIFAR ResNet-18 (3x3 stride 1 and 2, 1x1 stride-2 shortcuts; ``--layers resnet50``: each conv
shape of ResNet-50 at 224 px, for ``--batch 8``) and each sparsity, on the same tensors (interleaved, medians):

* dense: oneDNN's forward, grad-input and grad-weight on the zero-filled weight (what SWAT runs without kernels);
* the library's sparse paths (``leanprop.swat.sparse_kernels.conv_op_pairs``, what the calibration chooses
  between): "direct" (all three ops, :mod:`leanprop.ops.sparse_conv`, the batch innermost), "pointwise" (forward and
  grad-input of the 1x1 convs in their NCHW layout), "rows" (forward and grad-input of the k×k stride-1 convs, the
  padded rows innermost) and CSR/COO on im2col, each paying what it pays every step (the weight's CSR
  form, layout changes or im2col);
* SparseProp (Nikdan et al., ICML 2023; PyPI ``sparseprop``, when installed): its forward and its backward, which
  computes the input gradient and the gradient of the kept weights only, with the weight converted once (its
  masks are fixed) and the faster of its two vectorisations.

One JSONL record per (layer, sparsity, op, path) with ``ratio = path / dense``, plus "forward+grad_input" (each
compiled kernel and dense, against SparseProp's forward + backward) and "layer" (all three ops of one SWAT layer's
step, dW by the direct kernel); the report puts them side by side.

    leanprop bench kernels       # batch 64, 2 threads, 90 / 95 %, direct + pointwise + rows (+ sparseprop)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from pathlib import Path

__all__ = ["add_parser", "run", "main", "measure", "layer_label", "LAYERS", "RESNET50_LAYERS", "LAYER_SETS",
           "sparseprop_times"]

KIND = "kernels"
#: the library's sparse formats (``leanprop.swat.sparse_kernels.FORMATS``, written here to keep torch out of --help)
FORMATS = ("pointwise", "rows", "direct", "csr", "coo")

# (Cin, Cout, input H, kernel, stride) of CIFAR ResNet-18: the 3x3 stride-1 convs of the four stages, the 3x3
# stride-2 first convs of stages 2-4 and their 1x1 stride-2 shortcut convs
LAYERS = [(64, 64, 32, 3, 1), (128, 128, 16, 3, 1), (256, 256, 8, 3, 1), (512, 512, 4, 3, 1),
          (64, 128, 32, 3, 2), (128, 256, 16, 3, 2), (256, 512, 8, 3, 2),
          (64, 128, 32, 1, 2), (128, 256, 16, 1, 2), (256, 512, 8, 1, 2)]
# every distinct conv of ResNet-50 at 224 px after the stem (stride on the 3x3 conv, 1x1 stride-2 shortcuts)
RESNET50_LAYERS = [(64, 64, 56, 1, 1), (64, 64, 56, 3, 1), (64, 256, 56, 1, 1), (256, 64, 56, 1, 1),
                   (256, 128, 56, 1, 1), (128, 128, 56, 3, 2), (128, 512, 28, 1, 1), (256, 512, 56, 1, 2),
                   (512, 128, 28, 1, 1), (128, 128, 28, 3, 1),
                   (512, 256, 28, 1, 1), (256, 256, 28, 3, 2), (256, 1024, 14, 1, 1), (512, 1024, 28, 1, 2),
                   (1024, 256, 14, 1, 1), (256, 256, 14, 3, 1),
                   (1024, 512, 14, 1, 1), (512, 512, 14, 3, 2), (512, 2048, 7, 1, 1), (1024, 2048, 14, 1, 2),
                   (2048, 512, 7, 1, 1), (512, 512, 7, 3, 1)]
LAYER_SETS = {"resnet18": LAYERS, "resnet50": RESNET50_LAYERS}


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(KIND, help="sparse kernels of a SWAT conv layer against oneDNN and SparseProp",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="(SparseProp crashes at 128)")
    p.add_argument("--layers", choices=list(LAYER_SETS), default="resnet18",
                   help="the conv shapes: CIFAR ResNet-18's (default) or ResNet-50's at 224 px")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparsities", default="0.9,0.95")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--formats", default="direct,pointwise,rows",
                   help=f"library formats, a subset of {','.join(FORMATS)} (default: %(default)s)")
    p.add_argument("--no-sparseprop", action="store_true", help="skip SparseProp even when it is installed")
    p.add_argument("--out", default="benchmarks/results/sparse_kernels.jsonl")
    p.add_argument("--report", default="docs/benchmarks.md", help="'' to skip the report")
    p.set_defaults(bench_run=run)


def layer_label(cin: int, cout: int, h: int, k: int, stride: int) -> str:
    return f"{cin}->{cout}@{h}x{h}" + ("" if (k, stride) == (3, 1) else f" {k}x{k}/s{stride}")


def _sparse_of(t, s: float):
    """``(t's Top-K at sparsity s, its threshold)``."""
    from leanprop.swat.topk import keep_count, magnitude_threshold, sparsify

    thr = magnitude_threshold(t, keep_count(t.numel(), s))
    return sparsify(t, thr), float(thr)


def measure(cin: int, cout: int, h: int, k: int, stride: int, batch: int, s: float, reps: int,
            formats: tuple[str, ...], sparseprop: bool = False) -> dict[str, tuple[float, dict[str, float]]]:
    """``{op: (dense seconds, {path: seconds})}`` at sparsity ``s``: the three ops of the library's paths,
    "forward+grad_input" and "layer" (the three ops, dense and direct), and SparseProp's forward and
    forward+backward when asked. dW reads X with its threshold, as SWAT's backward does."""
    import torch

    from leanprop.swat.sparse_kernels import conv_grad_weight, conv_op_pairs
    from leanprop.timing import interleaved

    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(batch, cin, h, h, generator=g))
    w_s, _ = _sparse_of(torch.randn(cout, cin, k, k, generator=g), s)
    x_s, thr = _sparse_of(x, s)
    ho = (h + 2 * (k // 2) - k) // stride + 1
    grad = torch.randn(batch, cout, ho, ho, generator=g)
    pairs = conv_op_pairs(x, w_s, x_s, grad, (stride,) * 2, (k // 2,) * 2, (1, 1), formats)
    calls = {}
    for op, (dense, sparse) in pairs.items():
        calls[(op, "dense")] = dense
        calls.update({(op, f): fn for f, fn in sparse.items()})
    if "direct" in pairs["grad_weight"][1]:  # as SWAT's backward runs it: the dense X read with its threshold
        calls[("grad_weight", "direct")] = lambda: conv_grad_weight(x, grad, w_s.shape, (stride,) * 2,
                                                                    (k // 2,) * 2, (1, 1), "direct", thr)
    dfwd, ddx, ddw = pairs["forward"][0], pairs["grad_input"][0], pairs["grad_weight"][0]
    for fmt in ("direct", "pointwise", "rows"):  # the compiled kernels: dW by the direct one (the others have none)
        if fmt in pairs["forward"][1]:
            fwd, dx = pairs["forward"][1][fmt], pairs["grad_input"][1][fmt]
            dw = calls.get(("grad_weight", "direct"), ddw)
            calls[("forward+grad_input", fmt)] = lambda fwd=fwd, dx=dx: (fwd(), dx())
            calls[("layer", fmt)] = lambda fwd=fwd, dx=dx, dw=dw: (fwd(), dx(), dw())
    calls[("forward+grad_input", "dense")] = lambda: (dfwd(), ddx())
    calls[("layer", "dense")] = lambda: (dfwd(), ddx(), ddw())
    if sparseprop:
        sp_fwd, sp_step = sparseprop_times(x, w_s, grad, stride, k // 2, reps)
        calls[("forward", "sparseprop")] = sp_fwd
        calls[("forward+backward", "sparseprop")] = sp_step
    keys = list(calls)
    times = interleaved({str(i): calls[key] for i, key in enumerate(keys)}, rounds=reps, warmup=1)
    med = {key: statistics.median(times[str(i)]) for i, key in enumerate(keys)}
    out: dict[str, tuple[float, dict[str, float]]] = {}
    for (op, path), sec in med.items():
        if path == "dense":
            continue
        base = "forward+grad_input" if op == "forward+backward" else op
        out.setdefault(op, (med[(base, "dense")], {}))[1][path] = sec
    return out


def sparseprop_times(x, w_s, grad, stride: int, padding: int, reps: int):
    """``(forward fn, forward+backward fn)`` of SparseProp's conv on these tensors, with the faster of its two
    vectorisations (batch- or width-innermost, stride 1 only), chosen by timing as SparseProp itself does."""
    import torch
    from sparseprop.modules.conv2d import SparseConv2d

    from leanprop.timing import interleaved

    def module(voo: bool):
        return SparseConv2d(w_s.clone(), padding=padding, stride=stride, vectorizing_over_on=voo)

    xg = x.detach().clone().requires_grad_(True)
    mods = [module(False)] + ([module(True)] if stride == 1 else [])

    def step(m):
        def run():
            m(xg).backward(grad)
        return run

    t = interleaved({str(i): step(m) for i, m in enumerate(mods)}, rounds=max(2, reps // 2), warmup=1)
    best = mods[min(range(len(mods)), key=lambda i: statistics.median(t[str(i)]))]

    def fwd():
        with torch.no_grad():
            return best(x)

    return fwd, step(best)


def run(a: argparse.Namespace) -> int:
    import torch

    from leanprop.bench.report import write_report
    from leanprop.utils import append_jsonl, run_context

    formats = tuple(f for f in a.formats.split(",") if f)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"--formats {a.formats!r}: use a comma-separated subset of {','.join(FORMATS)}")
    sparseprop = not a.no_sparseprop and importlib.util.find_spec("sparseprop") is not None
    if not a.no_sparseprop and not sparseprop:
        print("SparseProp is not installed (pip install pybind11; pip install --no-build-isolation sparseprop): "
              "timing the library only", flush=True)
    if sparseprop and a.batch > 64:
        raise ValueError("SparseProp's kernel crashes at batches over 64: use --batch 64 or --no-sparseprop")
    torch.set_num_threads(a.threads)
    env, stamp = run_context()
    recs = []
    for cin, cout, h, k, stride in LAYER_SETS[a.layers]:
        for s in (float(v) for v in a.sparsities.split(",")):
            label = layer_label(cin, cout, h, k, stride)
            for op, (dense, by_path) in measure(cin, cout, h, k, stride, a.batch, s, a.reps, formats,
                                                sparseprop).items():
                for fmt, sparse in by_path.items():
                    r = {**env, "bench": "sparse_kernels", "timestamp": stamp, "layer": label,
                         "batch": a.batch, "threads": a.threads, "op": op, "format": fmt, "sparsity": s,
                         "dense_ms": dense * 1e3, "sparse_ms": sparse * 1e3, "ratio": sparse / dense}
                    recs.append(r)
                    print(f"{r['layer']:>18} {op:<18} {fmt:<10} s={s:.2f} dense {dense * 1e3:7.2f} ms  "
                          f"sparse {sparse * 1e3:7.2f} ms  ratio {sparse / dense:6.2f}", flush=True)
    append_jsonl(Path(a.out), recs)
    if a.report:
        write_report(Path(a.out).parent, Path(a.report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``leanprop bench kernels ARGV`` (``benchmarks/sparse_kernels.py``)."""
    from leanprop.bench import script_main

    return script_main(KIND, argv)
