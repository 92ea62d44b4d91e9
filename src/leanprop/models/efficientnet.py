"""EfficientNet-B0 for 32x32 CIFAR images (Tan & Le 2019)."""

from __future__ import annotations

import torch
from torch import nn

from ._options import check_dropout, check_in_channels, check_num_classes
from .registry import register
from .weight_init import init_weights_

__all__ = ["SqueezeExcite", "MBConv", "CifarEfficientNet", "efficientnet_b0", "EFFICIENTNET_B0_STAGES",
           "drop_path"]

#: (expansion, kernel, output channels, repeats, first stride) of the MBConv stages of EfficientNet-B0:
#: Table 1 of Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019.
EFFICIENTNET_B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 16, 1, 1),
    (6, 3, 24, 2, 2),
    (6, 5, 40, 2, 2),
    (6, 3, 80, 3, 2),
    (6, 5, 112, 3, 1),
    (6, 5, 192, 4, 2),
    (6, 3, 320, 1, 1),
)

# Batch norm as in the paper's training setup (decay 0.99, i.e. PyTorch momentum 0.01) with the reference eps.
_BN_EPS, _BN_MOMENTUM = 1e-3, 0.01


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016) on a residual branch:
    in training, zero the whole branch of each sample with probability ``p`` and scale survivors by
    ``1 / (1 - p)``; the identity otherwise."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu, Shen, Sun, CVPR 2018) as EfficientNet uses it: global average pool, 1x1
    conv to ``squeeze`` channels, SiLU, 1x1 conv back, sigmoid gate multiplied onto the input."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.expand(self.act(self.reduce(self.pool(x)))))
        return x * s


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excite (Tan & Le 2019, after Sandler et al. 2018 and Tan et al.
    2019, MnasNet): 1x1 expansion (BN, SiLU; absent when ``expansion == 1``), depthwise ``kernel`` x ``kernel``
    (BN, SiLU), squeeze-excite with ``max(1, in_channels // 4)`` channels (ratio 0.25 of the block input),
    1x1 linear projection (BN), and an identity shortcut with stochastic depth when the stride is 1 and the
    widths match."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int,
                 drop_prob: float = 0.0):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        if kernel % 2 != 1:
            raise ValueError(f"kernel must be odd, got {kernel!r}")
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_prob = drop_prob
        if expansion != 1:
            self.expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self.expand_bn = _bn(hidden)
            self.expand_act = nn.SiLU()
        self.dw_conv = nn.Conv2d(hidden, hidden, kernel, stride=stride, padding=kernel // 2, groups=hidden,
                                 bias=False)
        self.dw_bn = _bn(hidden)
        self.dw_act = nn.SiLU()
        self.se = SqueezeExcite(hidden, max(1, in_channels // 4))
        self.project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.project_bn = _bn(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "expand_conv"):
            out = self.expand_act(self.expand_bn(self.expand_conv(out)))
        out = self.dw_act(self.dw_bn(self.dw_conv(out)))
        out = self.project_bn(self.project_conv(self.se(out)))
        if self.use_residual:
            out = x + drop_path(out, self.drop_prob, self.training)
        return out

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}" if self.drop_prob else ""


class CifarEfficientNet(nn.Module):
    """EfficientNet-B0 (Tan & Le 2019, Table 1) for 32x32 inputs: 3x3 conv stem (32 channels, BN, SiLU),
    sixteen MBConv blocks, 1x1 conv to 1280 channels (BN, SiLU), global average pooling, dropout, linear.

    CIFAR-sized stem: stride 1 instead of the paper's 2 (the MBConv strides are the paper's, so the last
    feature map is 2x2).  ``stochastic_depth`` sets the residual-branch drop probability of block ``i`` (of 16)
    to ``stochastic_depth * i / 16``, growing linearly from 0 as in the reference code (the paper trains with
    0.2); it is off (0) by default.
    ``dropout`` before the classifier is the paper's 0.2 for B0.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.2, stochastic_depth: float = 0.0,
                 in_channels: int = 3):
        super().__init__()
        check_num_classes(num_classes)
        check_in_channels(in_channels)
        check_dropout("dropout", dropout)
        check_dropout("stochastic_depth", stochastic_depth)
        ch = 32
        self.stem = nn.Sequential(nn.Conv2d(in_channels, ch, 3, stride=1, padding=1, bias=False), _bn(ch),
                                  nn.SiLU())
        total = sum(n for *_, n, _ in EFFICIENTNET_B0_STAGES)
        blocks: list[nn.Module] = []
        for t, k, c, n, s in EFFICIENTNET_B0_STAGES:
            for i in range(n):
                blocks.append(MBConv(ch, c, k, s if i == 0 else 1, t, stochastic_depth * len(blocks) / total))
                ch = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(ch, 1280, 1, bias=False), _bn(1280), nn.SiLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1280, num_classes)
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


@register(
    "efficientnet_b0", family="cifar", input_size=32,
    description="EfficientNet-B0 (Tan & Le 2019) for CIFAR: stride-1 stem, MBConv with SiLU, depthwise 3x3/5x5 "
    "and squeeze-excite, ~4.02M params; stochastic depth off by default",
)
def efficientnet_b0(
    *, num_classes: int = 10, dropout: float = 0.2, stochastic_depth: float = 0.0, in_channels: int = 3
) -> CifarEfficientNet:
    return CifarEfficientNet(num_classes, dropout, stochastic_depth, in_channels=in_channels)
