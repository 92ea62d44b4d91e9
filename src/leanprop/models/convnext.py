"""ConvNeXt for 32x32 CIFAR images (Liu et al. 2022), at the "atto" size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._options import check_dropout, check_in_channels, check_num_classes
from .efficientnet import drop_path
from .registry import register

__all__ = ["LayerNorm2d", "ConvNeXtBlock", "CifarConvNeXt", "convnext_atto"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, written the usual way: permute to NHWC, normalise the
    last dimension, permute back.  Same parameters (and ``state_dict`` keys) as ``nn.LayerNorm(channels)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block (Liu et al. 2022, Fig. 4): depthwise 7x7 conv, then in channels-last layout LayerNorm,
    pointwise ``Linear`` to ``4 * dim``, GELU, ``Linear`` back to ``dim``, layer scale (a learnt per-channel
    factor, initialised to ``layer_scale_init``; Touvron et al. 2021, CaiT), and the residual add with
    stochastic depth."""

    def __init__(self, dim: int, layer_scale_init: float = 1e-6, drop_prob: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dwconv(x).permute(0, 2, 3, 1)  # NCHW -> NHWC
        out = self.pwconv2(self.act(self.pwconv1(self.norm(out))))
        out = (self.gamma * out).permute(0, 3, 1, 2)  # NHWC -> NCHW
        return x + drop_path(out, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}" if self.drop_prob else ""


class CifarConvNeXt(nn.Module):
    """ConvNeXt (Liu, Mao, Wu, Feichtenhofer, Darrell, Xie, "A ConvNet for the 2020s", CVPR 2022) for 32x32
    inputs: patchify stem (conv + LayerNorm), four stages of :class:`ConvNeXtBlock` separated by downsampling
    layers (LayerNorm + 2x2 conv, stride 2), global average pooling, LayerNorm and a linear head.

    CIFAR adaptation: the stem patchifies 2x2 (stride 2) instead of the paper's 4x4, so the four stages run at
    16/8/4/2 pixels.  Weights are initialised as in the paper's code release (truncated normal, std 0.02, zero
    biases); ``stochastic_depth`` is the last block's drop probability, growing linearly from 0 (off by default).
    """

    def __init__(
        self,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        dims: tuple[int, ...] = (40, 80, 160, 320),
        num_classes: int = 10,
        layer_scale_init: float = 1e-6,
        stochastic_depth: float = 0.0,
        in_channels: int = 3,
    ):
        super().__init__()
        check_num_classes(num_classes)
        check_in_channels(in_channels)
        check_dropout("stochastic_depth", stochastic_depth)
        if len(depths) != len(dims) or not depths or min(depths) < 1:
            raise ValueError(f"depths and dims must be equally long with depths >= 1, got {depths!r}, {dims!r}")
        if isinstance(layer_scale_init, bool) or not isinstance(layer_scale_init, (int, float)) \
                or not layer_scale_init > 0:
            raise ValueError(f"layer_scale_init must be a number > 0, got {layer_scale_init!r}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], 2, stride=2), LayerNorm2d(dims[0], eps=1e-6))
        total = sum(depths) - 1
        stages: list[nn.Module] = []
        k = 0
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            layers: list[nn.Module] = []
            if i > 0:
                layers += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, stride=2)]
            for _ in range(depth):
                p = stochastic_depth * k / total if total else 0.0
                layers.append(ConvNeXtBlock(dim, layer_scale_init, p))
                k += 1
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.fc = nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.norm(x))


@register(
    "convnext_atto", family="cifar", input_size=32,
    description="ConvNeXt (Liu et al. 2022) at the atto size (widths 40/80/160/320, depths 2/2/6/2) for CIFAR: "
    "2x2 patchify stem, depthwise 7x7, channels-last LayerNorm, GELU MLP, layer scale, ~3.4M params",
)
def convnext_atto(
    *, num_classes: int = 10, layer_scale_init: float = 1e-6, stochastic_depth: float = 0.0, in_channels: int = 3
) -> CifarConvNeXt:
    return CifarConvNeXt((2, 2, 6, 2), (40, 80, 160, 320), num_classes, layer_scale_init, stochastic_depth,
                         in_channels=in_channels)
