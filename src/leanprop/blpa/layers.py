"""BLPA's swapped layers: a BN->ReLU->Conv run becomes one fused unit without changing state_dict keys.

The BatchNorm2d becomes :class:`BLPABatchNorm2d` (same Parameters and buffers) that computes the whole unit
through :func:`leanprop.blpa.functions.bn_relu_conv`; the ReLU becomes ``nn.Identity`` and the Conv2d becomes
:class:`FusedConvTail` (same Parameters, identity forward), so the parent module's own ``forward`` -- e.g.
``conv(relu(bn(x)))`` -- still computes the same function. A BN->ReLU whose output goes elsewhere becomes a
"half" unit (``bn_relu``). Outside training mode (or without grad) the plain PyTorch ops run.

Under ``torch.compile`` the training-mode paths of these layers (the fused units' autograd Functions with their C
kernels, ``MaskReLU``, ``IndexMaxPool2d``) run eagerly inside the compiled graph (``torch.compiler.disable``, one
graph break each): traced, the compiler would choose what to keep for backward itself (e.g. the activation instead
of its codes or 1-bit mask). The plain eval paths are traced (docs/methods/blpa.md, "Execution modes").
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from leanprop.blpa.functions import UnitSpec, bn_relu, bn_relu_conv
from leanprop.ops.fusion import FusableConv
from leanprop.utils import swap_class

__all__ = ["BLPABatchNorm2d", "FusedConvTail", "BLPA_LAYERS", "make_unit", "unmake_unit"]


class FusedConvTail(nn.Conv2d):
    """The Conv2d of a fused unit: holds the conv's Parameters (same keys); its forward passes the unit's output on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if getattr(self, "_unit_active", False):
            return x
        return super().forward(x)


class BLPABatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d heading a BLPA unit: ``conv(ReLU(BN(x)))`` (full unit) or ``ReLU(BN(x))`` (half unit)."""

    blpa_spec: UnitSpec
    _conv: FusedConvTail | None
    _relu: nn.Module

    def _momentum_factor(self) -> float:
        """Exponential-average factor exactly as nn.BatchNorm2d computes it (updates num_batches_tracked)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return factor

    def _fused_active(self, x: torch.Tensor) -> bool:
        """Whether the fused Functions run (training mode and something needs a gradient); else the plain ops,
        which save nothing in that case anyway."""
        return self.training and torch.is_grad_enabled() and (x.requires_grad or _params_need_grad(self, self._conv))

    def _fused_args(self, x: torch.Tensor) -> tuple:
        """Arguments of the fused Functions (counts the batch in ``num_batches_tracked``)."""
        spec = dataclasses.replace(self.blpa_spec, momentum=self._momentum_factor())
        rm = self.running_mean if self.track_running_stats else None
        rv = self.running_var if self.track_running_stats else None
        return x, self.weight, self.bias, rm, rv, spec

    def _plain(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = F.relu(super().forward(x))
        conv = self._conv
        if isinstance(conv, FusableConv):
            return z, conv.fused_eval(z)  # eval / no grad: the conv's own rule (e.g. SWAT's sparse weights)
        return z, conv._conv_forward(z, conv.weight, conv.bias) if conv is not None else None

    def _policy_args(self) -> dict:
        """The fused Function's arguments for a conv of another method (:class:`FusableConv`), else none."""
        conv = self._conv
        w = conv.fused_weight() if isinstance(conv, FusableConv) else None
        return {} if w is None else {"weight_sparse": w, "policy": conv}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self._fused_active(x):
            z, out = self._plain(x)
            return z if out is None else out
        return self._fused(x, False)

    @torch.compiler.disable
    def _fused(self, x: torch.Tensor, return_z: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The unit through the fused Functions (eager under ``torch.compile``, see the module docstring)."""
        x, gamma, beta, rm, rv, spec = self._fused_args(x)
        if self._conv is None:
            return bn_relu(x, gamma, beta, rm, rv, spec)
        return bn_relu_conv(x, gamma, beta, self._conv.weight, self._conv.bias, rm, rv, spec, return_z=return_z,
                            **self._policy_args())

    @property
    def fuses_conv(self) -> bool:
        """Whether this head runs its conv too (a full unit), i.e. :meth:`unit_with_activation` applies."""
        return self._conv is not None

    def unit_with_activation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(conv(z), z)`` with ``z = ReLU(BN(x))``, for a block whose ``z`` also feeds a parameter-free
        shortcut: still only the codes are kept, and z's second gradient joins the conv's in backward."""
        if self._conv is None:
            raise ValueError("unit_with_activation needs a fused unit (a BN->ReLU->Conv run)")
        if not self._fused_active(x):
            z, out = self._plain(x)
            return out, z
        return self._fused(x, True)


def _params_need_grad(bn: nn.Module, conv: nn.Module | None) -> bool:
    ps = list(bn.parameters()) + (list(conv.parameters()) if conv is not None else [])
    return any(p.requires_grad for p in ps)


BLPA_LAYERS = (BLPABatchNorm2d, FusedConvTail)


def unit_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The zero padding a fused unit runs ``conv`` with, or None when it cannot: another padding mode, or
    ``padding="same"`` that pads unevenly (an even kernel extent).  ``"valid"`` is no padding; ``"same"`` (stride 1)
    pads ``dilation * (kernel - 1) / 2`` on each side."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)
    return (int(conv.padding[0]), int(conv.padding[1]))


def make_unit(bn: nn.BatchNorm2d, relu: nn.Module, conv: nn.Conv2d | None, spec_kwargs: dict, relu_name: str = "",
              conv_name: str | None = None) -> tuple[BLPABatchNorm2d, nn.Module, FusedConvTail | None]:
    """The three replacement modules of one unit (conv None: a half unit)."""
    if bn.training is False and not bn.track_running_stats:
        raise ValueError("BLPA needs BatchNorm2d layers that use batch statistics in training")
    head = swap_class(bn, BLPABatchNorm2d)
    tail = None
    if conv is not None:
        padding = unit_padding(conv)
        if padding is None:
            raise ValueError(f"a BLPA unit runs its conv with zero padding; this one pads with mode "
                             f"{conv.padding_mode!r}, padding {conv.padding!r} (find_units leaves such a conv out)")
        if isinstance(conv, FusableConv):  # another method's conv (SWAT + BLPA): same object, still driven by it
            conv.in_fused_unit = True
            tail = conv
        else:
            tail = swap_class(conv, FusedConvTail)
            tail._unit_active = True
        head.blpa_spec = UnitSpec(eps=bn.eps, momentum=0.0, stride=tuple(conv.stride), padding=padding,
                                  dilation=tuple(conv.dilation), groups=conv.groups, **spec_kwargs)
    else:
        head.blpa_spec = UnitSpec(eps=bn.eps, momentum=0.0, **spec_kwargs)
    object.__setattr__(head, "_conv", tail)  # a reference, not a submodule: keys stay where they were
    object.__setattr__(head, "_relu", relu)
    head.blpa_relu_name = relu_name
    head.blpa_conv_name = conv_name
    return head, nn.Identity(), tail


def unmake_unit(head: BLPABatchNorm2d) -> tuple[nn.BatchNorm2d, nn.Module, nn.Conv2d | None]:
    """The original modules (same Parameters) of a unit."""
    bn = swap_class(head, nn.BatchNorm2d)
    for attr in ("blpa_spec", "_conv", "_relu", "blpa_relu_name", "blpa_conv_name"):
        bn.__dict__.pop(attr, None)
    conv = None
    if isinstance(head._conv, FusableConv):  # stays the other method's layer; its own revert restores it
        conv = head._conv
        conv.__dict__.pop("in_fused_unit", None)
    elif head._conv is not None:
        conv = swap_class(head._conv, nn.Conv2d)
        conv.__dict__.pop("_unit_active", None)
    return bn, head._relu, conv
