"""Layers that keep less for backward than their PyTorch class, with exact gradients (same results):

* :class:`MaskReLU` keeps a 1-bit packed mask ``[x > 0]`` instead of its output (a ReLU's backward needs only
  which inputs were positive);
* :class:`IndexMaxPool2d` keeps one uint8 window position per output instead of its input and int64 indices;
* :class:`EagerReLU` (and :class:`EagerReLU6`, :class:`EagerHardtanh`, :class:`EagerLeakyReLU`) is the PyTorch
  activation whose training forward stays eager under ``torch.compile``.

``keep_masks_(model, kernels)`` swaps every plain ``nn.ReLU`` / ``nn.MaxPool2d`` of a model; ``revert_saving_layers_``
swaps them back. Each swap is a class change of the same object (same attributes, hooks and ``inplace``). The
training paths run eagerly inside a compiled graph (``torch.compiler.disable``, one graph break each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from leanprop.ops.kernels import CKernels
from leanprop.ops.packing import flat_memory_view, from_flat_memory, memory_format_of, pack_bits, unpack_bits
from leanprop.utils import set_submodule, swap_class

__all__ = ["mask_relu", "max_pool2d_window_index", "MaskReLU", "IndexMaxPool2d", "EagerReLU", "SAVING_LAYERS",
           "to_mask_relu", "from_mask_relu", "to_index_maxpool", "from_index_maxpool", "keep_masks_",
           "keep_activations_eager_", "revert_saving_layers_", "EagerReLU6", "EagerHardtanh", "EagerLeakyReLU"]


class _MaskReLU(torch.autograd.Function):
    """ReLU that keeps a 1-bit packed mask ``[x > 0]`` for backward instead of its output
    (docs/methods/blpa.md, 'Generic codec')."""

    @staticmethod
    def forward(ctx, x, kernels: CKernels | None):
        fmt = memory_format_of(x)
        fast = kernels is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
        if fast:
            out_flat, packed = kernels.relu_mask(flat_memory_view(x))
            out = from_flat_memory(out_flat, x.shape, fmt)
        else:
            out = torch.relu(x)
            packed = pack_bits(flat_memory_view((out > 0).to(torch.uint8)), 1)
        ctx.save_for_backward(packed)
        ctx.meta, ctx.kernels = (x.shape, fmt, x.numel()), kernels if fast else None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (packed,) = ctx.saved_tensors
        shape, fmt, numel = ctx.meta
        g = g.contiguous(memory_format=fmt)  # the gradient in the layout of the forward input (and of BN's)
        if ctx.kernels is not None and g.dtype in (torch.float32, torch.bfloat16):
            return from_flat_memory(ctx.kernels.relu_mask_backward(flat_memory_view(g), packed), shape, fmt), None
        m = unpack_bits(packed, 1, numel)
        return g * from_flat_memory(m, shape, fmt).to(g.dtype), None


def mask_relu(x: Tensor, kernels: CKernels | None = None) -> Tensor:
    """``ReLU(x)`` whose backward needs only 1 bit per element."""
    return _MaskReLU.apply(x, kernels)


def _window_position(flat: Tensor, h: int, w: int, out_shape, kernel, stride, padding, dilation) -> Tensor:
    """uint8 position ``dr * kw + dc`` of each max inside its window, from max-pool's flat per-plane indices.

    ``flat - (r0 * w + c0) = dr * dh * w + dc * dw``: with ``(kw - 1) * dw < w`` the row step ``dr`` is the number
    of multiples of ``dh * w`` the offset reaches (a few comparisons in int32 instead of int64 divisions)."""
    r0, c0 = _window_origins(out_shape[-2], out_shape[-1], stride, padding, flat.device)
    if (kernel[1] - 1) * dilation[1] >= w or kernel[0] > 8 or h * w >= 2**31:
        return (((flat // w - r0) // dilation[0]) * kernel[1] + (flat % w - c0) // dilation[1]).to(torch.uint8)
    off = (flat - (r0 * w + c0)).to(torch.int32)
    dr = torch.zeros_like(off)
    for i in range(1, kernel[0]):
        dr += off >= i * dilation[0] * w
    dc = off - dr * (dilation[0] * w)
    if dilation[1] != 1:
        dc = dc // dilation[1]
    return (dr * kernel[1] + dc).to(torch.uint8)


def _window_origins(out_h: int, out_w: int, stride, padding, device) -> tuple[Tensor, Tensor]:
    """Top-left input row of every output row and left input column of every output column."""
    rows = torch.arange(out_h, device=device).mul_(stride[0]).sub_(padding[0]).view(-1, 1)
    cols = torch.arange(out_w, device=device).mul_(stride[1]).sub_(padding[1]).view(1, -1)
    return rows, cols


class _MaxPoolWindowIndex(torch.autograd.Function):
    """2-D max pooling that keeps, for backward, only which window element was the maximum: one uint8 per
    output (``kh*kw <= 256``) instead of the input and int64 flat indices PyTorch keeps. Exact: the backward
    rebuilds the flat indices and scatter-adds the output gradient, as ``max_pool2d``'s backward does."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        out, flat = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        ctx.save_for_backward(_window_position(flat, x.shape[-2], x.shape[-1], out.shape, kernel, stride, padding,
                                               dilation))
        ctx.conf = (x.shape, memory_format_of(x), kernel, stride, padding, dilation)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (pos,) = ctx.saved_tensors
        shape, fmt, kernel, stride, padding, dilation = ctx.conf
        n, c, h, w = shape
        r0, c0 = _window_origins(g.shape[-2], g.shape[-1], stride, padding, g.device)
        # flat index = the window's top-left flat index + the offset of the window position (a kh*kw table)
        step = torch.arange(kernel[0] * kernel[1], device=g.device)
        table = (step // kernel[1]) * (dilation[0] * w) + (step % kernel[1]) * dilation[1]
        flat = table[pos.long()] + (r0 * w + c0)
        grad = g.new_zeros((n, c, h * w)).scatter_add_(2, flat.reshape(n, c, -1), g.reshape(n, c, -1))
        return grad.view(n, c, h, w).contiguous(memory_format=fmt), None, None, None, None, None


def max_pool2d_window_index(x: Tensor, kernel_size, stride=None, padding=0, dilation=1,
                            ceil_mode: bool = False) -> Tensor:
    """``F.max_pool2d(x, ...)`` (4-D or unbatched 3-D input) whose backward keeps one uint8 per output."""
    pair = torch.nn.modules.utils._pair
    kernel = pair(kernel_size)
    if kernel[0] * kernel[1] > 256:
        raise ValueError(f"max_pool2d_window_index: a {kernel} window has more than 256 positions")
    if x.dim() == 3:
        return max_pool2d_window_index(x.unsqueeze(0), kernel_size, stride, padding, dilation, ceil_mode).squeeze(0)
    stride = kernel if stride is None or stride in ([], ()) else pair(stride)  # F.max_pool2d's default
    return _MaxPoolWindowIndex.apply(x, kernel, stride, pair(padding), pair(dilation), ceil_mode)


class MaskReLU(nn.ReLU):
    """A ReLU outside fused units that keeps a 1-bit mask for backward (exact gradient, 1 bit per element)."""

    kernels = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.training and torch.is_grad_enabled() and x.requires_grad:
            return self._masked(x)
        return super().forward(x)

    @torch.compiler.disable
    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        return mask_relu(x, self.kernels)


def to_mask_relu(relu: nn.ReLU, kernels) -> MaskReLU:
    new = swap_class(relu, MaskReLU)
    new.kernels = kernels
    return new


def from_mask_relu(relu: MaskReLU) -> nn.ReLU:
    old = swap_class(relu, nn.ReLU)
    old.__dict__.pop("kernels", None)
    return old


class IndexMaxPool2d(nn.MaxPool2d):
    """An ``nn.MaxPool2d`` that keeps, for backward, one uint8 per output (which window element was the
    maximum) instead of its input and int64 indices; exact gradient (``max_pool2d_window_index``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.training and torch.is_grad_enabled() and x.requires_grad and not self.return_indices:
            return self._indexed(x)
        return super().forward(x)

    @torch.compiler.disable
    def _indexed(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2d_window_index(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)


def to_index_maxpool(pool: nn.MaxPool2d) -> nn.MaxPool2d:
    """``pool`` as an :class:`IndexMaxPool2d` (same attributes), or ``pool`` itself when its window has more
    than 256 positions or it returns indices."""
    kh, kw = torch.nn.modules.utils._pair(pool.kernel_size)
    return pool if pool.return_indices or kh * kw > 256 else swap_class(pool, IndexMaxPool2d)


def from_index_maxpool(pool: IndexMaxPool2d) -> nn.MaxPool2d:
    return swap_class(pool, nn.MaxPool2d)


class _EagerActivation:
    """The training forward of an activation module, kept eager under ``torch.compile`` (identical in eager mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.training and torch.is_grad_enabled():
            return self._eager(x)
        return super().forward(x)

    @torch.compiler.disable
    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class EagerReLU(_EagerActivation, nn.ReLU):
    """``nn.ReLU`` whose training forward stays eager under ``torch.compile`` (SWAT swaps every plain ReLU of an
    uncompressed model for one; identical in eager mode).

    Uncompressed SWAT keeps ``X`` for its backward because the ReLU that produced it saves the same storage
    (no extra bytes). A SWAT layer is a graph break under compile, so a compiled ReLU's output leaves its graph,
    and Inductor then saves a 1-byte mask for the ReLU's backward *besides* the ``X`` the SWAT layer keeps (+11 %
    kept bytes on resnet20 fp32, +23 % bf16, measured). Eager, the ReLU saves its output again, the one storage
    the SWAT layer shares: compiled SWAT keeps what eager SWAT keeps. See docs/methods/swat.md, "torch.compile".

    BLPA's storage policy swaps the ReLU-family modules for these classes too: run eagerly, each keeps its exact
    1-bit mask through the codec, where a traced one's backward would read the mask off what the compiled graph
    saves -- for the codec, 4-bit codes (docs/methods/blpa.md, "torch.compile").
    """


class EagerReLU6(_EagerActivation, nn.ReLU6):
    """``nn.ReLU6`` kept eager under ``torch.compile`` in training (see :class:`EagerReLU`)."""


class EagerHardtanh(_EagerActivation, nn.Hardtanh):
    """``nn.Hardtanh`` kept eager under ``torch.compile`` in training (see :class:`EagerReLU`)."""


class EagerLeakyReLU(_EagerActivation, nn.LeakyReLU):
    """``nn.LeakyReLU`` kept eager under ``torch.compile`` in training (see :class:`EagerReLU`)."""


_EAGER = {nn.ReLU: EagerReLU, nn.ReLU6: EagerReLU6, nn.Hardtanh: EagerHardtanh, nn.LeakyReLU: EagerLeakyReLU}
_PLAIN = {eager: plain for plain, eager in _EAGER.items()}


def keep_activations_eager_(model: nn.Module, types: tuple[type, ...] = tuple(_EAGER)) -> None:
    """Every plain module of ``types`` (default: ``nn.ReLU`` / ``nn.ReLU6`` / ``nn.Hardtanh`` / ``nn.LeakyReLU``) of
    ``model`` becomes its eager class (:class:`EagerReLU`...), whose training forward a compiled graph calls instead
    of tracing."""
    for name, m in list(model.named_modules()):
        if type(m) in types:
            set_submodule(model, name, swap_class(m, _EAGER[type(m)]))


SAVING_LAYERS = (MaskReLU, IndexMaxPool2d, *_PLAIN)


def keep_masks_(model: nn.Module, kernels: CKernels | None, relus: bool = True) -> None:
    """Every plain ``nn.ReLU`` of ``model`` keeps an exact 1-bit mask (:class:`MaskReLU`; ``kernels``: the compiled
    packer, or None for torch ops; ``relus=False`` leaves them, e.g. to a codec that sees them), every plain
    ``nn.MaxPool2d`` one uint8 window position per output."""
    for name, m in list(model.named_modules()):
        if type(m) is nn.ReLU and relus:
            set_submodule(model, name, to_mask_relu(m, kernels))
        elif type(m) is nn.MaxPool2d:
            set_submodule(model, name, to_index_maxpool(m))


def revert_saving_layers_(model: nn.Module) -> None:
    """Swap every layer of this module back to its PyTorch class."""
    back = {MaskReLU: from_mask_relu, IndexMaxPool2d: from_index_maxpool}
    for name, m in list(model.named_modules()):
        if type(m) in back:
            set_submodule(model, name, back[type(m)](m))
        elif type(m) in _PLAIN:
            set_submodule(model, name, swap_class(m, _PLAIN[type(m)]))
