"""Parameter-free residual shortcuts that widen the channel dimension with zeros."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ZeroPadShortcut"]


class ZeroPadShortcut(nn.Module):
    """Shortcut that downsamples spatially and zero-pads channels symmetrically.

    ``in_channels`` -> ``out_channels`` with ``(out_channels - in_channels) / 2`` zero
    channels added on each side.  Spatial downsampling by ``stride`` is either

    * ``"subsample"``: keep every ``stride``-th pixel (``x[..., ::s, ::s]``) -- the
      "option A" shortcut of He et al. 2016 (Deep Residual Learning, CIFAR-10 section);
    * ``"avg"``: average pooling with a ``stride`` x ``stride`` window (``ceil_mode`` so the
      output size matches a padded stride-``s`` convolution) -- the parameter-free shortcut
      of the BLPA reference implementation (Chakrabarti & Moseley 2019).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, downsample: str = "subsample"):
        super().__init__()
        extra = out_channels - in_channels
        if extra < 0 or extra % 2:
            raise ValueError(
                "zero-pad shortcut needs an even, non-negative channel increase, "
                f"got {in_channels}->{out_channels}"
            )
        if downsample not in ("subsample", "avg"):
            raise ValueError(f"downsample must be 'subsample' or 'avg', got {downsample!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.downsample = downsample
        self.pad = extra // 2
        if stride > 1 and downsample == "avg":
            self.pool: nn.Module = nn.AvgPool2d(stride, stride, ceil_mode=True)
        else:
            self.pool = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1 and self.downsample == "subsample":
            x = x[:, :, :: self.stride, :: self.stride]
        x = self.pool(x)
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad, self.pad))
        return x

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, downsample={self.downsample!r}"
        )
