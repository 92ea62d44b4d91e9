"""BLPA's fused pre-activation unit as autograd Functions (Chakrabarti & Moseley 2019; docs/methods/blpa.md).

``bn_relu_conv``: ``out = conv(ReLU(BN(x)), W)`` with batch statistics, computed exactly in forward. Kept
for backward: the packed K-bit codes of the BN output, a (C, 10) fp32 coefficient table and the
weights -- never ``x``, ``y = BN(x)`` or ``z = ReLU(y)``. Backward (closed form; Chakrabarti & Moseley 2019,
Fig. 2)::

    z~ = decode(codes)                         (approximate ReLU output)
    g_z, dW = convolution_backward(g, z~, W)   (g_z exact, dW approximate through z~)
    g_y = g_z * m                              (exact ReLU mask)
    dbeta = sum g_y,  dgamma = sum g_y * xhat~
    g_x = gamma * invstd * (g_y - mean(g_y) - xhat~ * mean(g_y * xhat~))

``bn_relu``: the same without the convolution (a BN->ReLU whose output feeds something other than one
conv, e.g. a pooling head or a shared shortcut): returns ``z`` and keeps only the codes.

With a fusable conv (:class:`leanprop.ops.fusion.FusableConv`, e.g. SWAT + BLPA, docs/methods/swat_blpa.md) the unit
asks the layer for its weight and threshold; for a SWAT conv: the forward convolves with
``W_s = TopK(W)``, the activation threshold is taken from the exact ``z`` (the layer's own Top-K schedule),
and the backward computes ``g_z`` from ``W_s`` and ``dW = conv_weight(TopK(z~), g)`` for the dense weight; ``W_s``
is kept as a 1-bit mask over the weight Parameter. Still only the codes are kept of the activation.

The weight is kept as the Parameter itself, never as a copy: under autocast the backward casts it again (a cast
kept for backward would be a weight-sized tensor the saved-tensor codec could take for an activation).

Under ``torch.autocast`` the convolution runs in the autocast dtype like ``nn.Conv2d``; BN keeps the input
dtype with fp32 statistics like ``nn.BatchNorm2d``; the coefficient table is always fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from leanprop.blpa import quantizer as qz
from leanprop.blpa.config import BLPAConfig
from leanprop.ops.autocast import autocast_dtype as _autocast_dtype
from leanprop.ops.autocast import autocast_off as _no_autocast
from leanprop.ops.autocast import cast as _cast
from leanprop.ops.autocast import to_dtype as _to
from leanprop.ops.fusion import FusableConv
from leanprop.ops.kernels import CKernels
from leanprop.ops.packing import flat_memory_view, from_flat_memory, memory_format_of, pack_bits, unpack_bits
from leanprop.ops.sparse_storage import pack_weight_mask, restore_sparse_weight
from leanprop.ops.sparsify import sparsify

__all__ = ["UnitSpec", "bn_relu_conv", "bn_relu", "ActivationStore"]


@dataclass(frozen=True)
class UnitSpec:
    """Static description of one unit: the quantiser settings, BN eps/momentum factor and conv geometry."""

    cfg: BLPAConfig
    kernels: CKernels | None
    eps: float
    momentum: float
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)  # numeric only: make_unit rejects 'same'/'valid'
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


class ActivationStore:
    """Encodes the BN output into what is kept for backward and decodes it there.

    ``save(...)`` returns (tensors for ``ctx.save_for_backward``, metadata); the other methods take them back.
    Formats: packed K-bit codes (default), ``bits=32`` (fp32 xhat + 1-bit mask, lossless up to rounding),
    ``simulate`` (fp32 xhat~ + bool mask: the K-bit gradients without the memory saving).
    """

    def __init__(self, spec: UnitSpec):
        self.spec = spec
        self.cfg = spec.cfg

    def _kernels_for(self, *ts: Tensor) -> CKernels | None:
        k = self.spec.kernels
        return k if k is not None and k.supports(self.cfg.bits, *ts) else None

    def save(self, x: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor | None, beta: Tensor | None
             ) -> tuple[list[Tensor], dict]:
        """Encode; afterwards ``y`` holds ReLU(y) (in place)."""
        cfg = self.cfg
        meta = {"shape": x.shape, "format": memory_format_of(x), "numel": x.numel()}
        coef = qz.channel_coefficients(mean, invstd, gamma, beta, cfg)
        if cfg.bits == 32:
            dt = torch.float64 if x.dtype == torch.float64 else torch.float32
            xhat = (x.to(dt) - qz.view_c(mean.to(dt), x.dim())) * qz.view_c(invstd.to(dt), x.dim())
            mask = pack_bits(flat_memory_view((y > 0).to(torch.uint8)), 1)
            y.relu_()
            return [xhat, mask, coef], meta
        k = self._kernels_for(x, y) if cfg.mode == "signaware" and not cfg.simulate else None
        if k is not None:
            return [k.encode(x, y, coef, cfg.bits, relu_inplace=True), coef], meta
        codes = flat_memory_view(qz.encode(x, y, mean, invstd, coef, cfg))
        y.relu_()
        if cfg.simulate:
            q = from_flat_memory(codes, x.shape, meta["format"])
            return [qz.decode_xhat(q, coef), qz.decode_mask(q, coef), coef], meta
        return [pack_bits(codes, cfg.bits), coef], meta

    def _exact_parts(self, saved: list[Tensor], meta: dict) -> tuple[Tensor, Tensor, Tensor]:
        """(xhat~, mask bool, coef) for the bits=32 and simulate formats."""
        if self.cfg.bits == 32:
            xhat, packed_mask, coef = saved
            m = unpack_bits(packed_mask, 1, meta["numel"]).bool()
            return xhat, from_flat_memory(m, meta["shape"], meta["format"]), coef
        return saved[0], saved[1], saved[2]

    def _codes(self, saved: list[Tensor], meta: dict) -> Tensor:
        q = unpack_bits(saved[0], self.cfg.bits, meta["numel"])
        return from_flat_memory(q, meta["shape"], meta["format"])

    def decode_z(self, saved: list[Tensor], meta: dict, like: Tensor) -> Tensor:
        """z~ shaped, laid out and typed like ``like``."""
        if self.cfg.bits == 32 or self.cfg.simulate:
            xhat, m, coef = self._exact_parts(saved, meta)
            d, i = xhat.dim(), qz.COEF.index
            z = (xhat * qz.view_c(coef[:, i("gamma")], d) + qz.view_c(coef[:, i("beta")], d)) * m
            return z.to(like.dtype).contiguous(memory_format=meta["format"])
        k = self._kernels_for(like)
        if k is not None:
            return k.decode_z(saved[0], saved[1], self.cfg.bits, like)
        return qz.decode_z(self._codes(saved, meta), saved[1], like.dtype).contiguous(memory_format=meta["format"])

    def bn_backward(self, saved: list[Tensor], meta: dict, g_z: Tensor, x_dtype: torch.dtype
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """(g_x, dgamma, dbeta) from the gradient of the ReLU output (closed form; docs/methods/blpa.md,
        'Fused unit')."""
        numel_c = meta["numel"] // meta["shape"][1]
        i = qz.COEF.index
        if self.cfg.bits != 32 and not self.cfg.simulate:
            packed, coef = saved
            g_z = g_z.contiguous(memory_format=meta["format"])
            k = self._kernels_for(g_z)
            if k is not None and g_z.dtype == x_dtype:
                s1, s2 = k.bn_sums(packed, g_z, coef, self.cfg.bits)
                gx = k.bn_grad_input(packed, g_z, coef, s1 / numel_c, s2 / numel_c, self.cfg.bits)
                return gx, s2, s1
            q = self._codes(saved, meta)
            xhat, m = qz.decode_xhat(q, coef), qz.decode_mask(q, coef)
        else:
            xhat, m, coef = self._exact_parts(saved, meta)
        d = xhat.dim()
        dims = [0] + list(range(2, d))
        g_y = g_z.to(xhat.dtype) * m
        s1 = g_y.sum(dims)
        s2 = (g_y * xhat).sum(dims)
        gx = g_y - qz.view_c(s1 / numel_c, d)
        gx -= xhat * qz.view_c(s2 / numel_c, d)
        gx *= qz.view_c(coef[:, i("K")], d)
        return gx.to(x_dtype), s2, s1


def _bn_forward(x: Tensor, gamma: Tensor | None, beta: Tensor | None, running_mean: Tensor | None,
                running_var: Tensor | None, spec: UnitSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Exact training-mode BN (PyTorch's own kernel; updates the running statistics in place)."""
    return torch.native_batch_norm(x, gamma, beta, running_mean, running_var, True, spec.momentum, spec.eps)


class _BNReLUConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, weight, bias, running_mean, running_var, spec: UnitSpec, return_z: bool,
                weight_sparse=None, policy=None):
        dev = x.device.type
        amp = _autocast_dtype(dev)
        with _no_autocast(dev, amp is not None):
            y, mean, invstd = _bn_forward(x, gamma, beta, running_mean, running_var, spec)
            store = ActivationStore(spec)
            saved, meta = store.save(x, y, mean, invstd, gamma, beta)  # y is now z = ReLU(y)
            z = y
            ctx.x_threshold = None
            if policy is not None:  # the conv's own threshold of the exact input (ops.fusion.FusableConv)
                with torch.no_grad():
                    ctx.x_threshold = policy.fused_input_threshold(z, weight_sparse)
            wc, bc = _cast(weight if weight_sparse is None else weight_sparse, amp), _cast(bias, amp)
            out = F.conv2d(_cast(z, amp), wc, bc, spec.stride, spec.padding, spec.dilation, spec.groups)
        if weight_sparse is None:  # the weight itself, cast again in backward: no copy of it is kept
            ctx.save_for_backward(*saved, weight)
            ctx.w_meta = None
        else:
            w_bits, ctx.w_meta = pack_weight_mask(weight_sparse)  # W_s = where(mask, W): no second dense copy
            ctx.save_for_backward(*saved, weight, w_bits)
        ctx.meta, ctx.spec, ctx.amp = meta, spec, amp
        ctx.dtypes = (x.dtype, None if gamma is None else gamma.dtype, weight.dtype,
                      None if bias is None else bias.dtype, wc.dtype)
        ctx.has_gamma, ctx.has_bias = gamma is not None, bias is not None
        if return_z:
            return out, z
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_z_extra=None):
        x_dtype, p_dtype, w_dtype, b_dtype, conv_dtype = ctx.dtypes
        if ctx.w_meta is None:
            *saved, weight = ctx.saved_tensors
            wc = _to(weight, conv_dtype)
        else:
            *saved, weight, w_bits = ctx.saved_tensors
            wc = restore_sparse_weight(weight, w_bits, ctx.w_meta, conv_dtype)
        spec, meta = ctx.spec, ctx.meta
        store = ActivationStore(spec)
        dev = g_out.device.type
        with _no_autocast(dev, ctx.amp is not None):
            like = torch.empty(meta["shape"], dtype=conv_dtype, device=g_out.device,
                               memory_format=meta["format"])
            z_t = store.decode_z(saved, meta, like)
            if ctx.x_threshold is not None:
                z_t = sparsify(z_t, ctx.x_threshold)  # SWAT: dW from TopK(z~); g_z needs only its shape
            g_out = g_out.to(conv_dtype)
            need = ctx.needs_input_grad
            g_z, dw, db = torch.ops.aten.convolution_backward(
                g_out, z_t, wc, [wc.shape[0]] if ctx.has_bias else None, list(spec.stride),
                list(spec.padding),
                list(spec.dilation), False, [0, 0], spec.groups, [True, need[3], ctx.has_bias and need[4]])
            del z_t
            if g_z_extra is not None:
                g_z = g_z + g_z_extra.to(g_z.dtype)
            gx, dgamma, dbeta = store.bn_backward(saved, meta, g_z, x_dtype)
        return (gx, _to(dgamma, p_dtype) if ctx.has_gamma else None, _to(dbeta, p_dtype) if ctx.has_gamma else None,
                _to(dw, w_dtype), _to(db, b_dtype) if db is not None else None, None, None, None, None, None, None)


class _BNReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, running_mean, running_var, spec: UnitSpec):
        dev = x.device.type
        amp = _autocast_dtype(dev)
        with _no_autocast(dev, amp is not None):
            y, mean, invstd = _bn_forward(x, gamma, beta, running_mean, running_var, spec)
            saved, meta = ActivationStore(spec).save(x, y, mean, invstd, gamma, beta)
        ctx.save_for_backward(*saved)
        ctx.meta, ctx.spec, ctx.amp = meta, spec, amp
        ctx.dtypes = (x.dtype, None if gamma is None else gamma.dtype)
        ctx.has_gamma = gamma is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g_z):
        x_dtype, p_dtype = ctx.dtypes
        with _no_autocast(g_z.device.type, ctx.amp is not None):
            gx, dgamma, dbeta = ActivationStore(ctx.spec).bn_backward(list(ctx.saved_tensors), ctx.meta, g_z, x_dtype)
        has = ctx.has_gamma
        return gx, _to(dgamma, p_dtype) if has else None, _to(dbeta, p_dtype) if has else None, None, None, None


def bn_relu_conv(x: Tensor, gamma: Tensor | None, beta: Tensor | None, weight: Tensor, bias: Tensor | None,
                 running_mean: Tensor | None, running_var: Tensor | None, spec: UnitSpec,
                 return_z: bool = False, weight_sparse: Tensor | None = None, policy: FusableConv | None = None
                 ) -> Tensor | tuple[Tensor, Tensor]:
    """``conv(ReLU(BN_train(x)))`` keeping only K-bit codes for backward. ``return_z`` also returns
    ``z = ReLU(BN(x))`` for a second consumer (e.g. an identity shortcut); its gradient joins the conv's.
    ``weight_sparse`` + ``policy`` (a :class:`~leanprop.ops.fusion.FusableConv`, e.g. a SWAT conv, whose
    ``fused_input_threshold`` gives the activation threshold): forward and ``dX`` with ``weight_sparse``, ``dW``
    from the thresholded decoded input (module docstring); the dense ``weight`` gets the gradient."""
    if (weight_sparse is None) != (policy is None):
        raise ValueError("bn_relu_conv: pass weight_sparse and policy together (a fusable conv) or neither")
    return _BNReLUConv.apply(x, gamma, beta, weight, bias, running_mean, running_var, spec, return_z,
                             weight_sparse, policy)


def bn_relu(x: Tensor, gamma: Tensor | None, beta: Tensor | None, running_mean: Tensor | None,
            running_var: Tensor | None, spec: UnitSpec) -> Tensor:
    """``ReLU(BN_train(x))`` keeping only K-bit codes for backward."""
    return _BNReLU.apply(x, gamma, beta, running_mean, running_var, spec)
