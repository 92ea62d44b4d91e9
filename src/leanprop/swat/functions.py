"""SWAT conv2d / linear as autograd Functions (Raihan & Aamodt, NeurIPS 2020; docs/methods/swat.md).

Forward: ``Y = conv(X, W_s) + b`` with the dense input X. Saved for backward: ``X_s = sparsify(X, x_threshold)``
and ``W_s`` only. Backward: ``dX`` from ``W_s`` and G, ``dW`` from ``X_s`` and G, returned as the gradient of the
*dense* weight (pruned weights keep learning), ``db = ΣG``; G is never modified. ``weight_sparse`` is the caller's
detached, already masked weight and gets no gradient, nor does ``x_threshold``.

The three functions are eager under ``torch.compile`` (``torch.compiler.disable``: a graph break each): their
saved tensors depend on the data (thresholds, packed values), and the backward is SWAT's own, not the
derivative of the forward. See docs/methods/swat.md, "torch.compile".

Under ``torch.autocast`` the forward computes in the autocast dtype like ``nn.Conv2d``/``nn.Linear`` do, saves the
low-precision tensors, and the backward returns dW/db in the parameters' dtype and dX in x's dtype. Thresholds stay
fp32 (see ``topk.sparsify``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from leanprop.ops.autocast import autocast_dtype as _autocast_dtype
from leanprop.ops.autocast import autocast_off as _no_autocast
from leanprop.ops.autocast import cast as _cast
from leanprop.ops.autocast import to_dtype as _to
from leanprop.ops.packing import memory_format_of
from leanprop.ops.sparse_storage import pack_above, pack_weight_mask, restore_sparse_weight, unpack_sparse
from leanprop.ops.sparsify import compiling as _compiling
from leanprop.ops.sparsify import sparsify
from leanprop.swat import sparse_kernels as sk

__all__ = ["swat_conv2d", "swat_linear", "swat_filter_conv2d"]

Threshold = Tensor | float | None


def _forward_and_save(ctx, op, x, weight, weight_sparse, bias, x_threshold, compress=False, sparse_ops=sk.NO_SPARSE):
    """The shared SWAT forward: ``op(X, W_s, b)`` in the autocast dtype (like nn.Conv2d / nn.Linear), then save
    ``X_s`` (only when dW is needed) and ``W_s``, plus the dtypes the backward must return.

    ``W_s`` is kept as the dense Parameter + a 1-bit mask of its non-zeros (never a second dense copy;
    no mask when ``weight_sparse`` is the Parameter's own storage, i.e. nothing is pruned). ``compress``: keep
    ``X_s`` as values + positions (:mod:`leanprop.ops.sparse_storage`); the backward restores both exactly.
    ``sparse_ops``: the sparse format (or None) of (forward, grad-input, grad-weight) (:mod:`.sparse_kernels`);
    ``op`` gets the forward's as its last argument. Always eager (the public functions are compiler-disabled)."""
    dev = x.device.type
    ctx.sparse_ops = sparse_ops = tuple(sparse_ops)
    amp = _autocast_dtype(dev)
    xc, ws, bc = _cast(x, amp), _cast(weight_sparse, amp), _cast(bias, amp)
    with _no_autocast(dev, amp is not None):
        y = op(xc, ws, bc, sparse_ops[0])
    w_bits = ctx.w_meta = None
    if weight_sparse.data_ptr() != weight.data_ptr():
        w_bits, ctx.w_meta = pack_weight_mask(weight_sparse)
    ctx.save_for_backward(*_save_x_s(ctx, xc, x_threshold, compress), weight, w_bits)
    ctx.w_dtype = ws.dtype
    ctx.x_shape = x.shape
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.amp = amp is not None
    return y


def _save_x_s(ctx, xc: Tensor, x_threshold: Threshold, compress: bool) -> tuple[Tensor | None, Tensor | None]:
    """The two saved tensors that hold ``X_s`` (None when dW is not needed): ``(X, None)`` when nothing is dropped;
    uncompressed, ``(X, threshold)`` -- ``X_s = TopK(X)`` is applied in the backward, because ``X`` itself is
    usually kept anyway (the ReLU that produced it saves its output: one storage, no extra bytes), where a
    zero-filled ``X_s`` would be a second dense tensor; packed, ``(positions, values)``.  Sets ``ctx.x_meta``
    (None unless packed). :func:`_x_s` restores ``X_s``."""
    ctx.x_meta = None
    if not ctx.needs_input_grad[1]:
        return None, None
    if _drops_nothing(x_threshold):  # dense X: no copy (and smaller than values + positions)
        return xc, None
    if not compress:  # the threshold is copied: the layer's buffer may be updated before this backward runs
        thr = (x_threshold.detach().clone() if isinstance(x_threshold, Tensor)
               else torch.tensor(float(x_threshold), dtype=torch.float32))
        return xc, thr
    positions, values, ctx.x_meta = pack_above(xc, x_threshold)
    return positions, values


def _x_s(ctx, a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``X_s`` from the two tensors :func:`_save_x_s` saved."""
    if ctx.x_meta is not None:
        return unpack_sparse(a, b, ctx.x_meta)
    return a if b is None else sparsify(a, b)


def _drops_nothing(thr: Threshold) -> bool:
    """True when the threshold keeps every entry (None or <= 0); a device tensor is assumed to drop some."""
    if thr is None:
        return True
    if isinstance(thr, Tensor):
        if thr.device.type != "cpu" or _compiling():
            return False
        thr = float(thr)
    return not thr > 0.0


def _saved(ctx, direct_dw: bool = False) -> tuple[Tensor | None, Tensor, tuple | None]:
    """``(X_s or None, W_s, None)`` as the forward computed them, restored from what it kept (``ctx.saved_tensors``
    is read once: a saved-tensor hook decodes each access). ``direct_dw``: where the direct dW kernel can read what
    the forward kept, ``(None, W_s, what it reads)`` instead, so X_s is never written out: ``(X, threshold)`` for
    the dense X (X_s = X where ``|X| >= threshold``, read as it goes), or ``(positions, values, meta)`` for a packed
    X_s in the mask form (its kept entries listed from the mask; a conv's NCHW X_s, see
    ``sparse_conv.packed_unsupported``)."""
    xa, xb, weight, w_bits = ctx.saved_tensors
    ws = weight.detach().to(ctx.w_dtype) if w_bits is None else restore_sparse_weight(weight, w_bits, ctx.w_meta,
                                                                                       ctx.w_dtype)
    if direct_dw and ctx.x_meta is None and xa is not None:
        return None, ws, (xa, 0.0 if xb is None else float(xb))
    if direct_dw and ctx.x_meta is not None and sk.packed_readable(xa, xb, ctx.x_meta):
        return None, ws, (xa, xb, ctx.x_meta)
    return _x_s(ctx, xa, xb), ws, None


class _SWATConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, weight_sparse, bias, x_threshold, stride, padding, dilation, groups, compress,
                sparse_ops):
        ctx.conf = (stride, padding, dilation, groups)

        def op(a, w, b, sparse):
            if sparse:
                return sk.conv_forward(a, w, b, stride, padding, dilation, sparse)
            return F.conv2d(a, w, b, stride, padding, dilation, groups)

        return _forward_and_save(ctx, op, x, weight, weight_sparse, bias, x_threshold, compress, sparse_ops)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        stride, padding, dilation, groups = ctx.conf
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], b_dtype is not None and ctx.needs_input_grad[3]]
        if not any(mask):
            return (None,) * 11
        sparse_dx, sparse_dw = mask[0] and bool(ctx.sparse_ops[1]), mask[1] and bool(ctx.sparse_ops[2])
        x_s, ws, x_thr = _saved(ctx, direct_dw=sparse_dw and ctx.sparse_ops[2] == "direct")
        g = _to(grad_out, ws.dtype)
        inp = x_s if x_s is not None else ws.new_empty(()).expand(ctx.x_shape)  # only its shape is read for dX
        dense_mask = [mask[0] and not sparse_dx, mask[1] and not sparse_dw, mask[2]]
        dx = dw = db = None
        with _no_autocast(g.device.type, ctx.amp):
            if any(dense_mask):
                dx, dw, db = torch.ops.aten.convolution_backward(
                    g, inp, ws, [ws.shape[0]] if mask[2] else None, list(stride), list(padding), list(dilation),
                    False, [0, 0], groups, dense_mask)
            if sparse_dx:
                dx = sk.conv_grad_input(g, ws, ctx.x_shape, stride, padding, dilation, ctx.sparse_ops[1])
            if sparse_dw and x_thr is not None and len(x_thr) == 3:  # the packed X_s, read as it is
                positions, values, meta = x_thr
                dw = sk.conv_grad_weight_packed(positions, values, meta.shape, g, ws.shape, stride, padding, dilation)
            elif sparse_dw:
                x_in, thr = x_thr if x_thr is not None else (x_s, 0.0)
                dw = sk.conv_grad_weight(x_in, g, ws.shape, stride, padding, dilation, ctx.sparse_ops[2], thr)
        return (_to(dx, x_dtype), _to(dw, w_dtype), None, _to(db, b_dtype) if mask[2] else None,
                None, None, None, None, None, None, None)


class _SWATLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, weight_sparse, bias, x_threshold, compress, sparse_ops):
        def op(a, w, b, sparse):
            return sk.linear_forward(a, w, b, sparse) if sparse else F.linear(a, w, b)

        return _forward_and_save(ctx, op, x, weight, weight_sparse, bias, x_threshold, compress, sparse_ops)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x_s, ws, _ = _saved(ctx)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = b_dtype is not None and ctx.needs_input_grad[3]
        g = _to(grad_out, ws.dtype).reshape(-1, ws.shape[0])
        dx = dw = db = None
        with _no_autocast(g.device.type, ctx.amp):
            if need_x:
                dx = (sk.linear_grad_input(g, ws, ctx.x_shape, ctx.sparse_ops[1]) if ctx.sparse_ops[1]
                      else g.mm(ws).view(ctx.x_shape))
            if need_w:  # (X_sᵀ·G)ᵀ, the official linear layer's weight gradient
                dw = (sk.linear_grad_weight(x_s, g, ws.shape, ctx.sparse_ops[2]) if ctx.sparse_ops[2]
                      else g.t().mm(x_s.reshape(-1, ws.shape[1])))
            if need_b:
                db = g.sum(0)
        return _to(dx, x_dtype), _to(dw, w_dtype), None, _to(db, b_dtype), None, None, None


def _same_padding(x: Tensor, weight: Tensor, stride: tuple[int, int], dilation: tuple[int, int]):
    """Explicit padding for padding="same": symmetric ints, plus the extra right/bottom zero that even kernels
    need, applied to x with F.pad exactly as PyTorch's own "same" convolution does."""
    if stride != (1, 1):
        raise ValueError("padding='same' is not supported for strided convolutions")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True)]
    left = [p // 2 for p in total]
    extra = [p - 2 * lft for p, lft in zip(total, left, strict=True)]  # right minus left padding: 0 or 1
    if any(extra):
        x = F.pad(x, [0, extra[1], 0, extra[0]])
    return x, (left[0], left[1])


@torch.compiler.disable
def swat_conv2d(x: Tensor, weight: Tensor, weight_sparse: Tensor, bias: Tensor | None = None,
                x_threshold: Threshold = None, stride=1, padding=0, dilation=1, groups: int = 1,
                compress: bool = False, sparse_ops: sk.SparseOps = sk.NO_SPARSE) -> Tensor:
    """SWAT 2-D convolution (Raihan & Aamodt 2020; docs/methods/swat.md, 'Technical details'):
    ``conv2d(x, weight_sparse, bias)`` in the forward; the backward gives
    ``dX`` from ``weight_sparse``, ``dW = conv2d_weight(sparsify(x, x_threshold), G)`` to the dense ``weight``
    and ``db = ΣG``.

    ``weight_sparse`` must be the detached masked weight, same shape as ``weight``; ``x_threshold`` is a 0-d fp32
    tensor or float (None or <= 0: X saved dense, no copy). ``stride``/``padding``/``dilation`` as in
    ``F.conv2d``, including padding="valid"/"same". x may be (N, C, H, W) or unbatched (C, H, W).
    W_s is kept as a 1-bit mask over ``weight``; ``compress=True`` also keeps X_s as values + positions (same
    gradients either way). ``sparse_ops``: (forward, grad-input, grad-weight) entries, each None (the dense kernel)
    or a sparse format ("csr", "coo"; True: "csr") of :mod:`leanprop.swat.sparse_kernels` (groups 1 only); same
    results up to summation order.
    """
    if weight_sparse.shape != weight.shape:
        raise ValueError(f"weight_sparse shape {tuple(weight_sparse.shape)} != weight shape {tuple(weight.shape)}")
    if x.dim() == 3:
        return swat_conv2d(x.unsqueeze(0), weight, weight_sparse, bias, x_threshold, stride, padding, dilation,
                           groups, compress, sparse_ops).squeeze(0)
    stride, dilation = _pair(stride), _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            x, padding = _same_padding(x, weight, stride, dilation)
        else:
            raise ValueError(f"padding {padding!r}: use an int, a pair, 'valid' or 'same'")
    else:
        padding = _pair(padding)
    sparse_ops = tuple(sk.format_of(f) for f in sparse_ops)
    if groups != 1 and any(sparse_ops):
        raise ValueError("sparse_ops: the sparse kernels support groups=1 only")
    return _SWATConv2d.apply(x, weight, weight_sparse, bias, x_threshold, stride, padding, dilation, groups,
                             compress, sparse_ops)


@torch.compiler.disable
def swat_linear(x: Tensor, weight: Tensor, weight_sparse: Tensor, bias: Tensor | None = None,
                x_threshold: Threshold = None, compress: bool = False,
                sparse_ops: sk.SparseOps = sk.NO_SPARSE) -> Tensor:
    """SWAT linear layer (Raihan & Aamodt 2020; docs/methods/swat.md, 'Technical details'): ``Y = x·W_sᵀ + b``;
    backward ``dX = G·W_s``, ``dW = (X_sᵀ·G)ᵀ`` for the
    dense ``weight``, ``db = ΣG``. x has shape (..., in); the leading dims are flattened in the backward.
    ``compress`` and ``sparse_ops`` as in :func:`swat_conv2d`."""
    if weight_sparse.shape != weight.shape:
        raise ValueError(f"weight_sparse shape {tuple(weight_sparse.shape)} != weight shape {tuple(weight.shape)}")
    return _SWATLinear.apply(x, weight, weight_sparse, bias, x_threshold, compress,
                             tuple(sk.format_of(f) for f in sparse_ops))


def _gather_channels(t: Tensor, keep: Tensor, fmt) -> Tensor:
    """``t[:, keep]`` in ``t``'s layout (channels-last: a gather along the innermost, contiguous dimension)."""
    if fmt is torch.channels_last:  # a gather over rows of the (N*H*W, C) view: far faster than index_select on it
        n, c, h, w = t.shape
        rows = t.contiguous(memory_format=fmt).permute(0, 2, 3, 1).reshape(-1, c)
        out = torch.gather(rows, 1, keep.view(1, -1).expand(rows.shape[0], keep.numel()))
        return out.view(n, h, w, keep.numel()).permute(0, 3, 1, 2)
    return t.index_select(1, keep)


def _scatter_channels(y_k: Tensor, keep: Tensor, channels: int, bias: Tensor | None, fmt) -> Tensor:
    """The full (N, channels, H, W) output: ``y_k`` at ``keep``, the bias (or 0) elsewhere, in ``y_k``'s layout."""
    n, _, h, w = y_k.shape
    if fmt is torch.channels_last:
        full = y_k.new_zeros((n, h, w, channels)) if bias is None else bias.expand(n, h, w, channels).clone()
        full.index_copy_(3, keep, y_k.contiguous(memory_format=fmt).permute(0, 2, 3, 1))
        return full.permute(0, 3, 1, 2)
    full = (y_k.new_zeros((n, channels, h, w)) if bias is None
            else bias.view(1, -1, 1, 1).expand(n, channels, h, w).clone())
    return full.index_copy_(1, keep, y_k.contiguous())


class _SWATFilterConv2d(torch.autograd.Function):
    """Filter-structured SWAT that computes only the kept filters (real speed, not masking)."""

    @staticmethod
    def forward(ctx, x, weight, bias, keep, x_threshold, stride, padding, dilation, dense_grad, compress):
        dev = x.device.type
        amp = _autocast_dtype(dev)
        fmt = torch.channels_last if x.dim() == 4 and memory_format_of(x) is torch.channels_last else None
        w_k = weight.detach().index_select(0, keep)
        xc, wc = _cast(x, amp), _cast(w_k, amp)
        bc = None if bias is None else _cast(bias.detach(), amp)
        with _no_autocast(dev, amp is not None):
            y_k = F.conv2d(xc, wc, None if bc is None else bc.index_select(0, keep), stride, padding, dilation, 1)
            y = _scatter_channels(y_k, keep, weight.shape[0], bc, fmt)
        ctx.conf = (stride, padding, dilation)
        ctx.dense_grad, ctx.amp, ctx.fmt = dense_grad, amp is not None, fmt
        ctx.save_for_backward(*_save_x_s(ctx, xc, x_threshold, compress), weight, keep)  # W[keep]: gathered again
        ctx.w_dtype = wc.dtype
        ctx.x_shape, ctx.w_shape = x.shape, weight.shape
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        xa, xb, weight, keep = ctx.saved_tensors
        x_s = _x_s(ctx, xa, xb)
        wc = weight.detach().index_select(0, keep).to(ctx.w_dtype)
        stride, padding, dilation = ctx.conf
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = b_dtype is not None and ctx.needs_input_grad[2]
        g = _to(g, wc.dtype)
        dx = dw = db = None
        with _no_autocast(g.device.type, ctx.amp):
            g_k = _gather_channels(g, keep, ctx.fmt)
            inp = x_s if x_s is not None else wc.new_empty(()).expand(ctx.x_shape)
            sparse_dw = need_w and not ctx.dense_grad
            dx, dw_k, _ = torch.ops.aten.convolution_backward(
                g_k, inp, wc, None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
                [need_x, sparse_dw, False])
            if sparse_dw:  # dense_grad_period: pruned filters get no weight gradient on this step
                dw = dw_k.new_zeros(ctx.w_shape).index_copy_(0, keep, dw_k)
            elif need_w:  # the paper's semantics: the dense weight gradient of every filter
                _, dw, _ = torch.ops.aten.convolution_backward(
                    g, x_s, wc.new_empty(()).expand(ctx.w_shape), None, list(stride), list(padding), list(dilation),
                    False, [0, 0], 1, [False, True, False])
            if need_b:
                db = g.sum((0, 2, 3))
        return (_to(dx, x_dtype), _to(dw, w_dtype), _to(db, b_dtype), None, None, None, None, None, None, None)


@torch.compiler.disable
def swat_filter_conv2d(x: Tensor, weight: Tensor, keep: Tensor, bias: Tensor | None = None,
                       x_threshold: Threshold = None, stride=1, padding=0, dilation=1, dense_grad: bool = True,
                       compress: bool = False) -> Tensor:
    """Filter-structured SWAT conv (``structure="filter"``, groups=1; docs/methods/swat.md, 'Real speed for
    structured SWAT') computing only the kept output filters ``keep``
    (sorted int64 indices): the forward and dX run a convolution with ``len(keep)`` filters (the pruned channels of
    Y are the bias, or 0), ``dW`` is the dense weight gradient of every filter (the paper's semantics) or, with
    ``dense_grad=False``, that of the kept filters only (zeros elsewhere). Same results as :func:`swat_conv2d`
    with the filter-masked weight, up to floating-point summation order."""
    if x.dim() != 4:
        raise ValueError(f"swat_filter_conv2d needs an (N, C, H, W) input, got shape {tuple(x.shape)}")
    if keep.dtype != torch.int64 or keep.dim() != 1:
        raise ValueError("keep must be a 1-D int64 tensor of kept filter indices")
    return _SWATFilterConv2d.apply(x, weight, bias, keep, x_threshold, _pair(stride), _pair(padding),
                                   _pair(dilation), dense_grad, compress)
