"""The interface through which a conv layer of one method runs inside another method's fused unit.

BLPA fuses ``BN -> ReLU -> conv`` into one autograd Function that keeps only K-bit codes of the BN output
(Chakrabarti & Moseley 2019, §3). When that conv is itself a method's layer (a SWAT conv: Raihan & Aamodt 2020,
§3), the fused Function asks the layer, through :class:`FusableConv`, for the weight the forward and the input
gradient use and for the threshold its weight gradient applies to the decoded activation. Neither method
imports the other; both import this interface (docs/methods/swat_blpa.md).
"""

from __future__ import annotations

import torch

__all__ = ["FusableConv"]


class FusableConv:
    """Mixin of a ``nn.Conv2d`` subclass that another method's fused unit may run.

    ``in_fused_unit``: set by the unit while it runs this conv; the conv's own ``forward`` then passes the
    unit's output on unchanged. ``fused_weight()``: the weight ``W'`` of the forward and of ``dX``, or None
    for the dense weight (the dense Parameter always receives ``dW``). ``fused_input_threshold(z, w)``: a
    magnitude threshold ``t`` of the exact conv input ``z`` (None: none); ``dW`` then comes from
    ``z~ * [|z~| >= t]``. ``fused_eval(z)``: the conv outside training (no grad, eval mode).
    """

    in_fused_unit: bool = False

    def fused_weight(self) -> torch.Tensor | None:
        return None

    def fused_input_threshold(self, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        return None

    def fused_eval(self, z: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(z, self.weight, self.bias)  # type: ignore[attr-defined]
