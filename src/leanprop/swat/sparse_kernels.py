"""Unstructured sparse (CSR) kernels for SWAT's three GEMMs, and the per-layer choice of kernel (issue 5).

A SWAT layer's training step has three products (spec §1.1):

* forward ``Y = conv(X, W_s)``  -- sparse path: ``CSR(W_s) @ im2col(X)``;
* grad-input ``dX = conv_T(G, W_s)``  -- sparse path: ``col2im(CSR(W_s)ᵀ @ G)``;
* grad-weight ``dW = conv_w(X_s, G)``  -- sparse path: ``(CSR(im2col(X_s)) @ Gᵀ)ᵀ``.

(Linear layers: the same without im2col.) The sparse paths give the dense kernels' results up to summation
order, and pay what a real sparse path pays every step: the dense -> CSR conversion (weights change every step,
activations every batch) and im2col/col2im.

Whether they are faster depends on the machine, the shapes and the sparsity, so leanprop does not guess:
:func:`calibrate` times both paths for every eligible layer at its real input shape, sparsity, dtype and
device, and a layer uses the sparse kernel for an op only where it measured faster by a margin
(``SWATConfig.sparse_kernels="auto"``, run by :meth:`SWATController.calibrate_kernels`). The per-op choice
is the layer's ``sparse_ops`` attribute: a ``(forward, grad_input, grad_weight)`` tuple of bools.
``benchmarks/sparse_kernels.py`` reports the break-even sparsity of each op.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OPS", "NO_SPARSE", "KernelTiming", "conv_forward", "conv_grad_input", "conv_grad_weight",
           "linear_forward", "linear_grad_input", "linear_grad_weight", "conv_op_pairs", "linear_op_pairs", "eligible",
           "calibrate", "format_table"]

OPS = ("forward", "grad_input", "grad_weight")
NO_SPARSE = (False, False, False)


def _csr(t: Tensor) -> Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state", once per process
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return t.contiguous().to_sparse_csr()


def _out_hw(x_hw, k, stride, padding, dilation) -> tuple[int, int]:
    return tuple((x_hw[i] + 2 * padding[i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(2))


def conv_forward(x: Tensor, w_s: Tensor, bias: Tensor | None, stride, padding, dilation) -> Tensor:
    """``conv2d(x, w_s, bias)`` (groups 1) as ``CSR(W_s) @ im2col(x)``, in ``x``'s memory format."""
    n, cout, k = x.shape[0], w_s.shape[0], tuple(w_s.shape[2:])
    cols = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride)  # (N, C·kh·kw, L)
    ho, wo = _out_hw(x.shape[2:], k, stride, padding, dilation)
    y = torch.sparse.mm(_csr(w_s.reshape(cout, -1)), cols.transpose(0, 1).reshape(cols.shape[1], -1))
    y = y.view(cout, n, ho, wo).permute(1, 0, 2, 3)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    return y.contiguous(memory_format=fmt)


def conv_grad_input(g: Tensor, w_s: Tensor, x_shape, stride, padding, dilation) -> Tensor:
    """``dX = conv_transpose(G, W_s)`` as ``col2im(CSR(W_sᵀ) @ G)``."""
    n, cout, k = g.shape[0], w_s.shape[0], tuple(w_s.shape[2:])
    gm = g.transpose(0, 1).reshape(cout, -1)  # (Cout, N·L)
    cols = torch.sparse.mm(_csr(w_s.reshape(cout, -1).t()), gm)  # (C·kh·kw, N·L)
    cols = cols.view(cols.shape[0], n, -1).transpose(0, 1)
    return F.fold(cols, tuple(x_shape[2:]), k, dilation=dilation, padding=padding, stride=stride)


def conv_grad_weight(x_s: Tensor, g: Tensor, w_shape, stride, padding, dilation) -> Tensor:
    """``dW = conv2d_weight(X_s, G)`` as ``(CSR(im2col(X_s)) @ Gᵀ)ᵀ``."""
    cout, k = g.shape[1], tuple(w_shape[2:])
    cols = F.unfold(x_s, k, dilation=dilation, padding=padding, stride=stride)
    cm = _csr(cols.transpose(0, 1).reshape(cols.shape[1], -1))  # (C·kh·kw, N·L)
    gm = g.transpose(0, 1).reshape(cout, -1)
    return torch.sparse.mm(cm, gm.t()).t().reshape(w_shape)


def linear_forward(x: Tensor, w_s: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ W_sᵀ + b`` as ``(CSR(W_s) @ xᵀ)ᵀ``; x has shape (..., in)."""
    y = torch.sparse.mm(_csr(w_s), x.reshape(-1, w_s.shape[1]).t()).t()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w_s.shape[0])


def linear_grad_input(g: Tensor, w_s: Tensor, x_shape) -> Tensor:
    """``dX = G @ W_s`` as ``(CSR(W_sᵀ) @ Gᵀ)ᵀ``."""
    return torch.sparse.mm(_csr(w_s.t()), g.reshape(-1, w_s.shape[0]).t()).t().reshape(x_shape)


def linear_grad_weight(x_s: Tensor, g: Tensor, w_shape) -> Tensor:
    """``dW = Gᵀ @ X_s`` as ``(CSR(X_sᵀ) @ G)ᵀ``."""
    return torch.sparse.mm(_csr(x_s.reshape(-1, w_shape[1]).t()), g.reshape(-1, w_shape[0])).t()


def eligible(layer) -> str | None:
    """None when ``layer`` (a SWAT layer) can use the sparse kernels, else why not."""
    if getattr(layer, "structure", None) is not None:
        return "structured"
    if getattr(layer, "_unit_active", False):
        return "runs inside a fused BLPA unit"
    if layer.sparsity <= 0:
        return "dense layer"
    if isinstance(layer, torch.nn.Conv2d):
        if layer.groups != 1:
            return "grouped conv"
        if isinstance(layer.padding, str):
            return "string padding"
    return None


@dataclass
class KernelTiming:
    """One op of one layer: both paths' median milliseconds and the choice (``sparse_ms`` None: not run)."""

    layer: str
    op: str
    dense_ms: float
    sparse_ms: float | None
    sparse: bool
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _median_ms(fn: Callable[[], Tensor], reps: int, sync: bool) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def conv_op_pairs(x: Tensor, w_s: Tensor, x_s: Tensor, g: Tensor, stride, padding, dilation
                  ) -> dict[str, tuple[Callable[[], Tensor], Callable[[], Tensor]]]:
    """``{op: (dense fn, sparse fn)}`` of a groups-1 conv on these tensors (x, x_s already padded by the layer's
    padding mode); the dense fns are the kernels SWAT's backward calls (oneDNN/cuDNN via ATen)."""
    conf = (tuple(stride), tuple(padding), tuple(dilation))
    cb = torch.ops.aten.convolution_backward

    def dense_dx():
        return cb(g, x, w_s, None, *map(list, conf), False, [0, 0], 1, [True, False, False])[0]

    def dense_dw():
        return cb(g, x_s, w_s, None, *map(list, conf), False, [0, 0], 1, [False, True, False])[1]

    return {"forward": (lambda: F.conv2d(x, w_s, None, *conf), lambda: conv_forward(x, w_s, None, *conf)),
            "grad_input": (dense_dx, lambda: conv_grad_input(g, w_s, x.shape, *conf)),
            "grad_weight": (dense_dw, lambda: conv_grad_weight(x_s, g, w_s.shape, *conf))}


def linear_op_pairs(x: Tensor, w_s: Tensor, x_s: Tensor, g: Tensor
                    ) -> dict[str, tuple[Callable[[], Tensor], Callable[[], Tensor]]]:
    """As :func:`conv_op_pairs` for a linear layer."""
    g2, xs2 = g.reshape(-1, w_s.shape[0]), x_s.reshape(-1, w_s.shape[1])
    return {"forward": (lambda: F.linear(x, w_s), lambda: linear_forward(x, w_s, None)),
            "grad_input": (lambda: g2.mm(w_s), lambda: linear_grad_input(g, w_s, x.shape)),
            "grad_weight": (lambda: g2.t().mm(xs2), lambda: linear_grad_weight(x_s, g, w_s.shape))}


def _op_pairs(layer, x: Tensor, w_s: Tensor, x_s: Tensor, g: Tensor) -> dict:
    if isinstance(layer, torch.nn.Conv2d):
        x, padding = layer._pad(x)
        x_s, _ = layer._pad(x_s)
        return conv_op_pairs(x, w_s, x_s, g, layer.stride, padding, layer.dilation)
    return linear_op_pairs(x, w_s, x_s, g)


def _signature(layer, x: Tensor, dtype: torch.dtype) -> tuple:
    conf = (tuple(layer.stride), layer.padding, tuple(layer.dilation), layer.padding_mode) \
        if isinstance(layer, torch.nn.Conv2d) else ()
    fmt = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return (type(layer).__name__, tuple(layer.weight.shape), tuple(x.shape), conf, dtype, x.device, fmt,
            round(layer.sparsity, 2))


@torch.no_grad()
def calibrate(layers: dict[str, torch.nn.Module], inputs: dict[str, Tensor], *, dtype: torch.dtype | None = None,
              reps: int = 3, margin: float = 0.05, timer: Callable[[str, str, Callable, int], float] | None = None,
              progress: Callable[[str], None] | None = None) -> list[KernelTiming]:
    """Time the dense and the sparse kernel of each op of each eligible layer on its input ``inputs[name]`` (at the
    layer's current ``W_s`` and its sparsity's ``X_s``, in ``dtype`` or the input's), set ``layer.sparse_ops`` to
    the ops where sparse was faster than ``(1 - margin)·dense``, and return one :class:`KernelTiming` per op.

    Layers with the same shapes, configuration and sparsity are timed once. An op whose sparse kernel raises
    (e.g. a dtype the CSR kernels lack) or whose result differs from the dense one stays dense, with a note.
    ``timer(layer_name, path, fn, reps)`` -> ms replaces the wall-clock median (tests)."""
    from leanprop.swat.topk import keep_count, magnitude_threshold, sparsify

    out: list[KernelTiming] = []
    done: dict[tuple, tuple[str, list[KernelTiming]]] = {}
    for name, layer in layers.items():
        why = eligible(layer)
        x = inputs.get(name)
        if why is not None or x is None:
            layer.sparse_ops = NO_SPARSE
            continue
        dt = dtype or x.dtype
        key = _signature(layer, x, dt)
        if key in done:
            first, timings = done[key]
            layer.sparse_ops = tuple(t.sparse for t in timings)
            out += [KernelTiming(name, t.op, t.dense_ms, t.sparse_ms, t.sparse, f"as {first}") for t in timings]
            continue
        if progress is not None:
            progress(name)
        xc = x.to(dt)
        w_s = layer._sparse_weight().to(dt)
        x_s = sparsify(xc, magnitude_threshold(xc, keep_count(xc.numel(), layer.sparsity)))
        y = _op_pairs(layer, xc, w_s, x_s, torch.zeros(0, dtype=dt, device=x.device))["forward"][0]()
        gen = torch.Generator(x.device).manual_seed(0)  # not the global RNG: training's stream is untouched
        g = torch.randn(y.shape, dtype=dt, device=x.device, generator=gen).contiguous(memory_format=_format_of(y))
        timings = [_time_op(name, op, dense, sparse, reps, margin, timer)
                   for op, (dense, sparse) in _op_pairs(layer, xc, w_s, x_s, g).items()]
        layer.sparse_ops = tuple(t.sparse for t in timings)
        done[key] = (name, timings)
        out += timings
    return out


def _format_of(t: Tensor):
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _time_op(name: str, op: str, dense: Callable, sparse: Callable, reps: int, margin: float,
             timer: Callable | None) -> KernelTiming:
    ref = dense()  # warm-up, and the reference result
    sync = ref.device.type == "cuda"
    measure = timer or (lambda _n, _p, fn, r: _median_ms(fn, r, sync))
    dense_ms = measure(name, "dense", dense, reps)
    try:
        got = sparse()
    except (RuntimeError, NotImplementedError) as e:
        return KernelTiming(name, op, dense_ms, None, False, f"sparse kernel failed: {str(e).splitlines()[0][:80]}")
    scale = float(ref.abs().max()) or 1.0
    tol = 1e-2 if ref.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if got.shape != ref.shape or float((got - ref).abs().max()) > tol * scale:
        return KernelTiming(name, op, dense_ms, None, False, "sparse result differs from dense")
    sparse_ms = measure(name, "sparse", sparse, reps)
    return KernelTiming(name, op, dense_ms, sparse_ms, sparse_ms < (1.0 - margin) * dense_ms)


def format_table(timings: list[KernelTiming]) -> str:
    """A fixed-width table of :func:`calibrate`'s result, one row per layer and op."""
    lines = [f"{'layer':<32} {'op':<12} {'dense ms':>9} {'sparse ms':>9} {'ratio':>6}  kernel"]
    for t in timings:
        sp = "-" if t.sparse_ms is None else f"{t.sparse_ms:9.2f}"
        ratio = "-" if t.sparse_ms is None else f"{t.sparse_ms / max(t.dense_ms, 1e-9):6.2f}"
        note = f"  ({t.note})" if t.note else ""
        lines.append(f"{t.layer[:32]:<32} {t.op:<12} {t.dense_ms:9.2f} {sp:>9} {ratio:>6}  "
                     f"{'sparse' if t.sparse else 'dense'}{note}")
    n_sparse = sum(t.sparse for t in timings)
    lines.append(f"{n_sparse} of {len(timings)} layer-ops use the sparse kernel")
    return "\n".join(lines)
