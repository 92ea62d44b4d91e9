"""Unstructured sparse (CSR / COO) kernels for SWAT's three GEMMs, and the per-layer choice of kernel.

A SWAT layer's training step has three products (docs/methods/swat.md, 'Technical details'):

* forward ``Y = conv(X, W_s)``  -- sparse paths: ``S(W_s) @ im2col(X)``, or "direct";
* grad-input ``dX = conv_T(G, W_s)``  -- sparse paths: ``col2im(S(W_sᵀ) @ G)``, or "direct";
* grad-weight ``dW = conv_w(X_s, G)``  -- sparse paths: ``(S(im2col(X_s)) @ Gᵀ)ᵀ``, or "direct" (driven by the
  kept entries of X_s, dense output);

with ``S`` the CSR or the COO form (``torch.sparse.mm``), "direct" the compiled direct convolution of
:mod:`leanprop.ops.sparse_conv` (fp32 and bf16 CPU convs: the weight in CSR, the batch innermost, no im2col)
and "pointwise" its other layout for 1×1 convs of NCHW tensors (the pixels innermost, no layout change; forward and
grad-input), "rows" the same product for k×k stride-1 convs over the padded rows (width innermost; fp32; forward and
grad-input). Linear layers: CSR/COO without im2col, and (fp32 or bf16, CPU) the pointwise kernel on the transposed
rows for the forward and grad-input, the direct dW of a 1×1 conv for the grad-weight. The sparse paths give the
dense kernels' results up to summation order, and pay what a real sparse path pays every step: the dense -> sparse
conversion (weights change every step, activations every batch), im2col/col2im or the layout change.

Whether they are faster depends on the machine, the shapes and the sparsity, so leanprop does not guess:
:func:`calibrate` times both paths for every eligible layer at its real input shape, sparsity, dtype and
device, and a layer uses the sparse kernel for an op only where it measured faster by a margin
(``SWATConfig.sparse_kernels="auto"``, run by :meth:`SWATController.calibrate_kernels`). The per-op choice
is the layer's ``sparse_ops`` attribute: a ``(forward, grad_input, grad_weight)`` tuple whose entries are None
(dense) or a format, "csr", "coo", "direct", "pointwise" or "rows" (True means "csr").

The calibration is bounded: its trials spend at most 2 times the dense time of every SWAT layer's three ops
(:class:`Budget`), so that with the capturing forward it stays under 3 dense training steps; a trial whose
workspace would exceed twice the dense op's operands is not run (im2col of a k×k conv); identical shapes are
timed once.
``benchmarks/sparse_kernels.py`` reports the break-even sparsity of each op.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from leanprop.ops import sparse_conv
from leanprop.ops.packing import memory_format_of
from leanprop.timing import time_calls

__all__ = ["OPS", "FORMATS", "NO_SPARSE", "format_of", "KernelTiming", "conv_forward", "conv_grad_input",
           "conv_grad_weight", "linear_forward", "linear_grad_input", "linear_grad_weight", "conv_op_pairs",
           "linear_op_pairs", "eligible", "calibrate", "format_table", "Budget", "workspace_bytes", "DIRECT_OPS",
           "POINTWISE_OPS", "ROWS_OPS", "COMPILED"]

OPS = ("forward", "grad_input", "grad_weight")
FORMATS = ("pointwise", "rows", "direct", "csr", "coo")  # the order trials run in: the likeliest winner first
DIRECT_OPS = OPS  # the ops the direct kernel has (convs only)
POINTWISE_OPS = ("forward", "grad_input")  # the pointwise kernel's (1×1 convs; dW: the direct kernel)
ROWS_OPS = ("forward", "grad_input")  # the rows kernel's (k×k stride-1 convs; dW: the direct kernel)
COMPILED = ("pointwise", "rows", "direct")  # the compiled kernels (sparse_conv), against torch.sparse's CSR/COO
NO_SPARSE = (None, None, None)
SparseOps = tuple  # (forward, grad_input, grad_weight): each None, "csr", "coo" (or a bool: True is "csr")


def format_of(flag) -> str | None:
    """The sparse format an entry of ``sparse_ops`` asks for (None: the dense kernel; "direct": the compiled
    direct convolution)."""
    if not flag:
        return None
    fmt = "csr" if flag is True else flag
    if fmt not in FORMATS:
        raise ValueError(f"sparse kernel format {flag!r}: use one of {', '.join(FORMATS)} (or None for dense)")
    return fmt


def _sparse(t: Tensor, fmt: str) -> Tensor:
    if fmt == "coo":
        return t.to_sparse()
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state", once per process
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return t.contiguous().to_sparse_csr()


def _out_hw(x_hw, k, stride, padding, dilation) -> tuple[int, int]:
    return tuple((x_hw[i] + 2 * padding[i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(2))


def conv_forward(x: Tensor, w_s: Tensor, bias: Tensor | None, stride, padding, dilation, fmt: str = "csr"
                 ) -> Tensor:
    """``conv2d(x, w_s, bias)`` (groups 1) as ``S(W_s) @ im2col(x)`` or by the direct kernel (``fmt="direct"``), in
    ``x``'s memory format."""
    if fmt == "direct":
        return sparse_conv.conv_forward(x, w_s, bias, stride, padding, dilation)
    if fmt == "pointwise":
        return sparse_conv.pointwise_forward(x, w_s, bias, stride, padding, dilation)
    if fmt == "rows":
        return sparse_conv.rows_forward(x, w_s, bias, stride, padding, dilation)
    n, cout, k = x.shape[0], w_s.shape[0], tuple(w_s.shape[2:])
    cols = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride)  # (N, C·kh·kw, L)
    ho, wo = _out_hw(x.shape[2:], k, stride, padding, dilation)
    y = torch.sparse.mm(_sparse(w_s.reshape(cout, -1), fmt), cols.transpose(0, 1).reshape(cols.shape[1], -1))
    y = y.view(cout, n, ho, wo).permute(1, 0, 2, 3)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y.contiguous(memory_format=memory_format_of(x))


def conv_grad_input(g: Tensor, w_s: Tensor, x_shape, stride, padding, dilation, fmt: str = "csr") -> Tensor:
    """``dX = conv_transpose(G, W_s)`` as ``col2im(S(W_sᵀ) @ G)`` or by the direct kernel (``fmt="direct"``)."""
    if fmt == "direct":
        return sparse_conv.conv_grad_input(g, w_s, x_shape, stride, padding, dilation)
    if fmt == "pointwise":
        return sparse_conv.pointwise_grad_input(g, w_s, x_shape, stride, padding, dilation)
    if fmt == "rows":
        return sparse_conv.rows_grad_input(g, w_s, x_shape, stride, padding, dilation)
    n, cout, k = g.shape[0], w_s.shape[0], tuple(w_s.shape[2:])
    gm = g.transpose(0, 1).reshape(cout, -1)  # (Cout, N·L)
    cols = torch.sparse.mm(_sparse(w_s.reshape(cout, -1).t(), fmt), gm)  # (C·kh·kw, N·L)
    cols = cols.view(cols.shape[0], n, -1).transpose(0, 1)
    return F.fold(cols, tuple(x_shape[2:]), k, dilation=dilation, padding=padding, stride=stride)


def conv_grad_weight(x_s: Tensor, g: Tensor, w_shape, stride, padding, dilation, fmt: str = "csr",
                     threshold: float = 0.0) -> Tensor:
    """``dW = conv2d_weight(X_s, G)`` as ``(S(im2col(X_s)) @ Gᵀ)ᵀ``, or by the direct kernel from the entries of
    ``x_s`` with ``|x| >= threshold`` (``fmt="direct"``: ``x_s`` may then be the dense X, sparsified as it is read;
    the other formats take X_s itself)."""
    if fmt == "direct":
        return sparse_conv.conv_grad_weight(x_s, g, w_shape, stride, padding, dilation, threshold)
    if fmt in ("pointwise", "rows"):
        raise ValueError(f"the {fmt} kernel has no weight gradient; use 'direct' (it takes every conv they take), "
                         "'csr', 'coo' or dense (None)")
    cout, k = g.shape[1], tuple(w_shape[2:])
    cols = F.unfold(x_s, k, dilation=dilation, padding=padding, stride=stride)
    cm = _sparse(cols.transpose(0, 1).reshape(cols.shape[1], -1), fmt)  # (C·kh·kw, N·L)
    gm = g.transpose(0, 1).reshape(cout, -1)
    return torch.sparse.mm(cm, gm.t()).t().reshape(w_shape)


def packed_readable(positions: Tensor, values: Tensor, meta) -> bool:
    """Whether the direct dW kernel reads this packed X_s (``ops.sparse_storage.PackedSparse``) without expanding
    it: the mask form (made by the compiled packer) of an NCHW 4-D CPU tensor, fp32 or bf16, with the compiled kernels
    built."""
    return meta.offsets is not None and sparse_conv.load_sparse_conv() is not None \
        and sparse_conv.packed_unsupported(positions, values, meta.shape, meta.memory_format, meta.indexed) is None


def conv_grad_weight_packed(positions: Tensor, values: Tensor, x_shape, g: Tensor, w_shape, stride, padding,
                            dilation) -> Tensor:
    """The direct dW kernel on SWAT's packed X_s (:func:`packed_readable`), which it never expands."""
    return sparse_conv.conv_grad_weight_packed(positions, values, x_shape, g, w_shape, stride, padding, dilation)


def linear_forward(x: Tensor, w_s: Tensor, bias: Tensor | None, fmt: str = "csr") -> Tensor:
    """``x @ W_sᵀ + b`` as ``(S(W_s) @ xᵀ)ᵀ``, or by the pointwise kernel (``fmt="pointwise"``); x has shape
    (..., in)."""
    if fmt == "pointwise":
        return sparse_conv.linear_forward(x, w_s, bias)
    _no_direct(fmt, "a linear layer's forward")
    y = torch.sparse.mm(_sparse(w_s, fmt), x.reshape(-1, w_s.shape[1]).t()).t()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w_s.shape[0])


def linear_grad_input(g: Tensor, w_s: Tensor, x_shape, fmt: str = "csr") -> Tensor:
    """``dX = G @ W_s`` as ``(S(W_sᵀ) @ Gᵀ)ᵀ``, or by the pointwise kernel."""
    if fmt == "pointwise":
        return sparse_conv.linear_grad_input(g, w_s, x_shape)
    _no_direct(fmt, "a linear layer's grad-input")
    return torch.sparse.mm(_sparse(w_s.t(), fmt), g.reshape(-1, w_s.shape[0]).t()).t().reshape(x_shape)


def linear_grad_weight(x_s: Tensor, g: Tensor, w_shape, fmt: str = "csr") -> Tensor:
    """``dW = Gᵀ @ X_s`` as ``(S(X_sᵀ) @ G)ᵀ``, or by the direct kernel from the non-zeros of ``x_s``."""
    if fmt == "direct":
        return sparse_conv.linear_grad_weight(x_s, g, w_shape)
    _no_direct(fmt, "a linear layer's grad-weight")
    return torch.sparse.mm(_sparse(x_s.reshape(-1, w_shape[1]).t(), fmt), g.reshape(-1, w_shape[0])).t()


def _no_direct(fmt: str, what: str) -> None:
    if fmt in COMPILED:
        raise ValueError(f"the {fmt} kernel has no path for {what}; use the other compiled kernel ('pointwise' for "
                         "a linear layer's forward and grad-input, 'direct' for its grad-weight), 'csr', 'coo' or "
                         "dense (None)")


def eligible(layer) -> str | None:
    """None when ``layer`` (a SWAT layer) can use the sparse kernels, else why not."""
    if getattr(layer, "structure", None) is not None:
        return "structured"
    if getattr(layer, "in_fused_unit", False):
        return "runs inside another method's fused unit"
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
    """One op of one layer: the dense and the fastest sparse kernel's median milliseconds (``sparse_ms`` None:
    none ran), that kernel's format, and whether the layer uses it (``sparse``)."""

    layer: str
    op: str
    dense_ms: float
    sparse_ms: float | None
    sparse: bool
    format: str | None = None
    note: str = ""
    cost_ms: float = 0.0  # what timing this op took (0 when its shapes were timed at another layer)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def choice(self) -> str | None:
        """The ``sparse_ops`` entry: the format when the sparse kernel is used, else None."""
        return self.format if self.sparse else None


def _median_ms(fn: Callable[[], Tensor], reps: int, sync: bool) -> float:
    return 1e3 * statistics.median(time_calls(fn, reps=reps, sync=torch.cuda.synchronize if sync else None))


def _first_run_ms(fn: Callable[[], Tensor], sync: bool) -> tuple[Tensor, float]:
    """The result of one run of ``fn`` and its milliseconds."""
    out: list[Tensor] = []
    ms = 1e3 * time_calls(lambda: out.append(fn()), reps=1, sync=torch.cuda.synchronize if sync else None)[0]
    return out[0], ms


OpPairs = dict  # {op: (dense fn, {format: sparse fn})}


def conv_op_pairs(x: Tensor, w_s: Tensor, x_s: Tensor, g: Tensor, stride, padding, dilation,
                  formats=FORMATS) -> OpPairs:
    """``{op: (dense fn, {format: sparse fn})}`` of a groups-1 conv on these tensors (x, x_s already padded by
    the layer's padding mode); the dense fns are the kernels SWAT's backward calls (oneDNN/cuDNN via ATen). The
    direct kernel is offered for all three ops where it takes the conv and its library builds, the pointwise one for
    the forward and the grad-input of a 1×1 conv on an NCHW input."""
    conf = (_pair(stride), _pair(padding), _pair(dilation))
    cb = torch.ops.aten.convolution_backward
    built = any(f in COMPILED for f in formats) and sparse_conv.load_sparse_conv() is not None
    direct = built and "direct" in formats and sparse_conv.unsupported(x, w_s, stride, padding, dilation) is None
    pointwise = built and "pointwise" in formats and \
        sparse_conv.pointwise_unsupported(x, w_s, stride, padding, dilation) is None
    rows = built and "rows" in formats and sparse_conv.rows_unsupported(x, w_s, stride, padding, dilation) is None

    def offered(op):
        return [f for f in formats if f not in COMPILED or (direct and f == "direct" and op in DIRECT_OPS)
                or (pointwise and f == "pointwise" and op in POINTWISE_OPS)
                or (rows and f == "rows" and op in ROWS_OPS)]

    def dense_dx():
        return cb(g, x, w_s, None, *map(list, conf), False, [0, 0], 1, [True, False, False])[0]

    def dense_dw():
        return cb(g, x_s, w_s, None, *map(list, conf), False, [0, 0], 1, [False, True, False])[1]

    return {"forward": (lambda: F.conv2d(x, w_s, None, *conf),
                        {f: functools.partial(conv_forward, x, w_s, None, *conf, f) for f in offered("forward")}),
            "grad_input": (dense_dx, {f: functools.partial(conv_grad_input, g, w_s, x.shape, *conf, f)
                                      for f in offered("grad_input")}),
            "grad_weight": (dense_dw, {f: functools.partial(conv_grad_weight, x_s, g, w_s.shape, *conf, f)
                                       for f in offered("grad_weight")})}


def linear_op_pairs(x: Tensor, w_s: Tensor, x_s: Tensor, g: Tensor, formats=FORMATS) -> OpPairs:
    """As :func:`conv_op_pairs` for a linear layer: CSR/COO, and where the compiled kernels build and take it (fp32
    CPU) the pointwise kernel for the forward and grad-input, the direct one for the grad-weight."""
    g2, xs2 = g.reshape(-1, w_s.shape[0]), x_s.reshape(-1, w_s.shape[1])
    compiled = any(f in COMPILED for f in formats) and sparse_conv.linear_unsupported(x, w_s) is None \
        and sparse_conv.load_sparse_conv() is not None
    mine = {"forward": "pointwise", "grad_input": "pointwise", "grad_weight": "direct"}

    def offered(op):
        return [f for f in formats if f not in COMPILED or (compiled and f == mine[op])]

    return {"forward": (lambda: F.linear(x, w_s), {f: functools.partial(linear_forward, x, w_s, None, f)
                                                   for f in offered("forward")}),
            "grad_input": (lambda: g2.mm(w_s), {f: functools.partial(linear_grad_input, g, w_s, x.shape, f)
                                                for f in offered("grad_input")}),
            "grad_weight": (lambda: g2.t().mm(xs2), {f: functools.partial(linear_grad_weight, x_s, g, w_s.shape, f)
                                                     for f in offered("grad_weight")})}


def _op_pairs(layer, x: Tensor, w_s: Tensor, x_s: Tensor, g: Tensor, formats=FORMATS) -> OpPairs:
    if isinstance(layer, torch.nn.Conv2d):
        x, padding = layer._pad(x)
        x_s, _ = layer._pad(x_s)
        pairs = conv_op_pairs(x, w_s, x_s, g, layer.stride, padding, layer.dilation, formats)
        if getattr(layer, "compress", False) and formats:
            pairs["grad_weight"] = _packed_dw_pair(pairs["grad_weight"], x_s, g, w_s.shape, layer.stride, padding,
                                                   layer.dilation)
        return pairs
    return linear_op_pairs(x, w_s, x_s, g, formats)


def _packed_dw_pair(pair, x_s: Tensor, g: Tensor, w_shape, stride, padding, dilation):
    """The grad-weight trials of a layer that keeps X_s packed (``compress_saved``), as its backward pays them: every
    path expands X_s first, except the direct kernel where it reads the packed form as it is
    (:func:`packed_readable`); packing is the forward's and costs every path the same, so it is not timed."""
    from leanprop.ops.sparse_storage import pack_above, unpack_sparse

    positions, values, meta = pack_above(x_s, torch.finfo(torch.float32).tiny)
    dense, sparse = pair

    def expanded(fn):
        return lambda: (unpack_sparse(positions, values, meta), fn())[1]

    paths = {f: expanded(fn) for f, fn in sparse.items()}
    if "direct" in sparse and packed_readable(positions, values, meta):
        paths["direct"] = functools.partial(conv_grad_weight_packed, positions, values, x_s.shape, g, w_shape, stride,
                                            padding, dilation)
    return expanded(dense), paths


def workspace_bytes(layer, x: Tensor, w_s: Tensor, y: Tensor, fmt: str, op: str = "forward") -> tuple[int, int]:
    """``(sparse path's workspace, dense op's operands)`` in bytes, estimated from the shapes: the dense op reads
    and writes X, W and Y; CSR/COO on a conv build im2col (C·k² rows per output pixel); the direct kernel's forward
    and input gradient hold X and Y once more in its layout (batch padded to 8 lanes), its weight gradient G
    channels-last (padded by the kernel's reach) and W; the pointwise kernel its output, the strided pixels of its
    input, the weight's CSR and, in bf16, each thread's fp32 chunk of input and output rows; on a linear layer the
    sparse copy is at most the operand. In bf16 the compiled kernels compute in fp32: the direct forward and input
    gradient also hold fp32 copies of X and Y, the weight gradient one of G."""
    el = x.element_size()
    dense = (x.numel() + w_s.numel() + y.numel()) * el
    if not isinstance(layer, torch.nn.Conv2d):
        return dense, dense
    n, widened = x.shape[0], el < 4 and fmt in COMPILED
    if fmt == "pointwise":
        s = layer.stride[0]
        chunks = widened * (x.shape[1] + y.shape[1]) * sparse_conv.PW_CHUNK * 4 * torch.get_num_threads()
        return (x.numel() // (s * s) * (s > 1) + y.numel()) * el + 3 * w_s.numel() * 4 + chunks, dense
    if fmt == "rows":  # X padded (+ the weight's CSR), the output over the padded width, and its cropped copy
        k = w_s.shape[2:]
        pad = layer.padding if isinstance(layer.padding, tuple) else (0, 0)
        if op == "grad_input":
            pad = (k[0] - 1 - pad[0], k[1] - 1 - pad[1])
            x, y = y, x  # G (Y's shape) is padded, dX (X's shape) produced
        hp, wp = x.shape[2] + 2 * pad[0], x.shape[3] + 2 * pad[1]
        return (n * x.shape[1] * hp * wp + y.numel() // max(y.shape[3], 1) * wp + y.numel()) * el \
            + 3 * w_s.numel() * 4, dense
    if fmt == "direct" and op == "grad_weight":
        k, s = w_s.shape[2:], layer.stride[0]
        return (n * (y.shape[2] + k[0] // s + 1) * (y.shape[3] + k[1] // s + 1) * sparse_conv.lanes(y.shape[1])
                + 2 * w_s.numel() + widened * y.numel()) * 4, dense
    if fmt == "direct":
        pad = layer.padding if isinstance(layer.padding, tuple) else (0, 0)
        hp, wp = x.shape[2] + 2 * pad[0], x.shape[3] + 2 * pad[1]
        return ((x.shape[1] * hp * wp + y[0].numel()) * sparse_conv.lanes(n)
                + widened * (x.numel() + y.numel())) * 4, dense
    return n * w_s[0].numel() * y[0, 0].numel() * el, dense


def _over_workspace(layer, x: Tensor, w_s: Tensor, y: Tensor, fmt: str, op: str) -> bool:
    """Whether ``fmt``'s workspace for ``op`` exceeds twice the dense op's operands (:func:`workspace_bytes`)."""
    sparse, dense = workspace_bytes(layer, x, w_s, y, fmt, op)
    return sparse > 2 * dense


def _signature(layer, x: Tensor, dtype: torch.dtype) -> tuple:
    conf = (tuple(layer.stride), layer.padding, tuple(layer.dilation), layer.padding_mode) \
        if isinstance(layer, torch.nn.Conv2d) else ()
    return (type(layer).__name__, tuple(layer.weight.shape), tuple(x.shape), conf, dtype, x.device,
            memory_format_of(x), round(layer.sparsity, 2))


@dataclass
class Budget:
    """Milliseconds a calibration may still spend: it grows by ``steps`` × (the dense time of an op × how many
    layers share its shapes) as the dense op is timed, and shrinks by every millisecond any trial takes. Each op of
    each shape gets its own (what one leaves is not carried over); the caller's one sums what they spent."""

    steps: float = 2.0  # with the capturing forward and the tensors' set-up, under 3 dense steps (docs/benchmarks.md)
    left_ms: float = 0.0
    spent_ms: float = 0.0

    def earn(self, dense_ms: float, layers: int) -> None:
        self.left_ms += self.steps * dense_ms * layers

    def spend(self, ms: float) -> None:
        self.left_ms -= ms
        self.spent_ms += ms


@torch.no_grad()
def calibrate(layers: dict[str, torch.nn.Module], inputs: dict[str, Tensor], *, dtype: torch.dtype | None = None,
              reps: int = 1, margin: float = 0.05, formats=FORMATS,
              timer: Callable[[str, str, Callable, int], float] | None = None,
              progress: Callable[[str], None] | None = None, budget: Budget | None = None) -> list[KernelTiming]:
    """Time the dense kernel and each sparse format's kernel for each op of each eligible layer on its input
    ``inputs[name]`` (at the layer's current ``W_s`` and its sparsity's ``X_s``, in ``dtype`` or the input's), set
    ``layer.sparse_ops`` to the fastest format for the ops where it beat ``(1 - margin)·dense``, and return one
    :class:`KernelTiming` per op.

    Layers with the same shapes, configuration and sparsity are timed once. A sparse kernel that raises (e.g. a
    dtype the sparse kernels lack) or whose result differs from the dense one is not used, with a note; one whose
    workspace would exceed twice the dense op's operands, or that its op's budget (``budget.steps`` × its dense
    time per layer sharing the shape) no longer covers, is not run; ``budget`` sums what they all spent.
    ``timer(layer_name, path, fn, reps)`` -> ms (path: "dense" or a format) replaces the wall-clock median."""
    budget = budget if budget is not None else Budget()
    out: list[KernelTiming] = []
    done: dict[tuple, tuple[str, list[KernelTiming]]] = {}
    keys = {name: _signature(layer, x, dtype or x.dtype) for name, layer in layers.items()
            if (x := inputs.get(name)) is not None and eligible(layer) is None}
    shared = {k: list(keys.values()).count(k) for k in set(keys.values())}
    for name, layer in layers.items():
        x = inputs.get(name)
        if name not in keys:
            layer.sparse_ops = NO_SPARSE
            continue
        key = keys[name]
        if key in done:
            first, timings = done[key]
            timings = [dataclasses.replace(t, layer=name, note=f"as {first}", cost_ms=0.0) for t in timings]
        else:
            if progress is not None:
                progress(name)
            (xc, w_s, x_s, y, g), setup_ms = _first_run_ms(
                functools.partial(_trial_tensors, layer, x, dtype or x.dtype), False)
            # each op of this shape has its own budget (2x its dense time per layer sharing the shape), so that no
            # op or layer starves another; building the tensors (about one dense forward) is counted in the total
            # and in the first op's cost, not against one op's trials
            setup_ms = setup_ms if timer is None else 0.0
            timings = []
            for op, (dense, sparse) in _op_pairs(layer, xc, w_s, x_s, g, formats).items():
                mine = Budget(steps=budget.steps)
                too_big = {f: "workspace over 2x the dense op's" for f in sparse
                           if _over_workspace(layer, xc, w_s, y, f, op)}
                timings.append(_time_op(name, op, dense, {f: fn for f, fn in sparse.items() if f not in too_big},
                                        reps, margin, timer, budget=mine, layers=shared[key], skipped=too_big))
                budget.spent_ms += mine.spent_ms  # (what one op leaves unspent is not carried over)
            timings[0].cost_ms += setup_ms
            budget.spent_ms += setup_ms
            done[key] = (name, timings)
        layer.sparse_ops = tuple(t.choice for t in timings)
        out += timings
    return out


def _trial_tensors(layer, x: Tensor, dt: torch.dtype) -> tuple[Tensor, ...]:
    """``(X, W_s, X_s, Y, G)`` of a layer's trials: its input in ``dt``, its current sparse weight, X's Top-K at the
    layer's sparsity, the dense output and a fixed random output gradient in Y's layout."""
    from leanprop.swat.topk import keep_count, magnitude_threshold, sparsify

    xc = x.to(dt)
    w_s = layer._sparse_weight().to(dt)
    x_s = sparsify(xc, magnitude_threshold(xc, keep_count(xc.numel(), layer.sparsity)))
    y = _op_pairs(layer, xc, w_s, x_s, xc.new_zeros(0), ())["forward"][0]()  # the dense Y: G's shape
    gen = torch.Generator(x.device).manual_seed(0)  # not the global RNG: training's stream is untouched
    g = torch.randn(y.shape, dtype=dt, device=x.device, generator=gen)
    return xc, w_s, x_s, y, g.contiguous(memory_format=memory_format_of(y))


def _warm_up(fmt: str, like: Tensor) -> None:
    """One tiny sparse product in ``fmt``, so that a kernel's first timed run carries no one-time library set-up."""
    if fmt in COMPILED:
        sparse_conv.load_sparse_conv()
        return
    try:
        a = torch.eye(4, dtype=like.dtype, device=like.device)
        torch.sparse.mm(_sparse(a, fmt), a)
    except (RuntimeError, NotImplementedError):
        pass  # the real run reports it


def _time_op(name: str, op: str, dense: Callable, sparse: dict[str, Callable], reps: int, margin: float,
             timer: Callable | None, *, budget: Budget | None = None, layers: int = 1,
             skipped: dict[str, str] | None = None) -> KernelTiming:
    """Time one op on the wall clock: the dense kernel's first run (also the reference result), then each sparse
    format while the budget lasts -- a first run, checked against the reference -- and stop at the first format that
    wins clearly (below 0.8x dense). Where one run each cannot tell (within 0.2 of the margin), dense and that format
    are timed ``reps`` more times if the budget covers it. An injected ``timer`` measures every path it is given,
    and then only its milliseconds count against the budget."""
    budget = budget if budget is not None else Budget(steps=float("inf"))
    ref, dense_ms = _first_run_ms(dense, torch.cuda.is_available() and torch.cuda.is_initialized())
    sync = ref.device.type == "cuda"
    real = timer is None
    if not real:
        dense_ms = timer(name, "dense", dense, reps)
    cost = dense_ms if real else dense_ms * reps
    budget.earn(dense_ms, layers)
    budget.spend(cost)
    scale = float(ref.abs().max()) or 1.0
    tol = 1e-2 if ref.dtype in (torch.float16, torch.bfloat16) else 1e-4
    best: tuple[float, str] | None = None
    notes = [f"{f}: {why}" for f, why in (skipped or {}).items()]
    for fmt, fn in sparse.items():
        if real and best is not None and best[0] < 0.8 * dense_ms and fmt not in COMPILED:
            break  # a clear winner already: CSR/COO (slow to try) are not tried; every compiled layout is
        # a compiled kernel's trial costs about a dense run; CSR/COO often several (im2col, conversion): those run only
        # where the budget holds two dense runs more, i.e. on shapes several layers share
        if budget.left_ms < (1.0 if fmt in COMPILED else 2.0) * dense_ms:
            notes.append(f"{fmt}: calibration budget spent")
            continue
        _warm_up(fmt, ref)
        try:
            got, ms = _first_run_ms(fn, sync)  # the first run, and the check
        except (RuntimeError, NotImplementedError, ValueError) as e:
            notes.append(f"{fmt} failed: {str(e).splitlines()[0][:60]}")
            continue
        if got.shape != ref.shape or float((got - ref).abs().max()) > tol * scale:
            budget.spend(ms * real)
            cost += ms * real
            notes.append(f"{fmt} result differs from dense")
            continue
        if not real:
            ms = timer(name, fmt, fn, reps)
            budget.spend(reps * ms)
            cost += reps * ms
        else:
            budget.spend(ms)
            cost += ms
            if abs(ms / max(dense_ms, 1e-9) - (1.0 - margin)) < 0.2 and budget.left_ms >= reps * (ms + dense_ms):
                dense_ms = _median_ms(dense, reps, sync)
                ms = _median_ms(fn, reps, sync)
                budget.spend(reps * (ms + dense_ms))
                cost += reps * (ms + dense_ms)
        if best is None or ms < best[0]:
            best = (ms, fmt)
    note = "; ".join(notes)
    if best is None:
        return KernelTiming(name, op, dense_ms, None, False, None, note, cost)
    return KernelTiming(name, op, dense_ms, best[0], best[0] < (1.0 - margin) * dense_ms, best[1], note, cost)


def format_table(timings: list[KernelTiming]) -> str:
    """A fixed-width table of :func:`calibrate`'s result, one row per layer and op."""
    lines = [f"{'layer':<32} {'op':<12} {'dense ms':>9} {'sparse ms':>9} {'format':>6} {'ratio':>6}  kernel"]
    for t in timings:
        sp = "-" if t.sparse_ms is None else f"{t.sparse_ms:9.2f}"
        ratio = "-" if t.sparse_ms is None else f"{t.sparse_ms / max(t.dense_ms, 1e-9):6.2f}"
        note = f"  ({t.note})" if t.note else ""
        lines.append(f"{t.layer[:32]:<32} {t.op:<12} {t.dense_ms:9.2f} {sp:>9} {t.format or '-':>6} {ratio:>6}  "
                     f"{t.format if t.sparse else 'dense'}{note}")
    n_sparse = sum(t.sparse for t in timings)
    lines.append(f"{n_sparse} of {len(timings)} layer-ops use a sparse kernel; timing them took "
                 f"{sum(t.cost_ms for t in timings) / 1e3:.1f} s")
    return "\n".join(lines)
