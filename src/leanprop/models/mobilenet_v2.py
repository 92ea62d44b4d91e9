"""MobileNetV2 for 32x32 CIFAR images (Sandler et al. 2018), with a width multiplier."""

from __future__ import annotations

import torch
from torch import nn

from ._options import check_dropout, check_in_channels, check_num_classes
from .registry import register
from .weight_init import init_weights_

__all__ = ["InvertedResidual", "CifarMobileNetV2", "mobilenet_v2", "MOBILENET_V2_SETTINGS", "round_channels"]

#: (expansion t, output channels c, repeats n, first stride s) of each bottleneck stage: Table 2 of
#: Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.
MOBILENET_V2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def round_channels(channels: float, divisor: int = 8) -> int:
    """``channels`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``), never more than 10 %
    below ``channels``: how the MobileNet reference scales layer widths by the width multiplier."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


class InvertedResidual(nn.Module):
    """MobileNetV2 bottleneck: 1x1 expansion (BN, ReLU6; absent when ``expansion == 1``), depthwise 3x3
    (BN, ReLU6), 1x1 linear projection (BN, no activation: the "linear bottleneck"), and an identity
    shortcut added when the stride is 1 and the widths match (Sandler et al. 2018, Fig. 4d and Table 1).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018, Table 2) for 32x32 inputs: 3x3 conv stem (32 channels, BN, ReLU6),
    seventeen inverted-residual bottlenecks, 1x1 conv to 1280 channels (BN, ReLU6), global average pooling,
    dropout and a linear classifier.

    CIFAR adaptation: the stem convolution has stride 1 instead of the paper's 2 (a 32x32 image would
    otherwise shrink to 1x1 before the last stage); the bottleneck strides are the paper's, so the last
    feature map is 2x2.  ``width_mult`` scales every width by the multiplier (rounded to multiples of 8),
    except that the last 1x1 conv keeps 1280 channels for multipliers below 1 (Sec. 5.1 of the paper).
    """

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2, in_channels: int = 3):
        super().__init__()
        check_num_classes(num_classes)
        check_in_channels(in_channels)
        check_dropout("dropout", dropout)
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
            raise ValueError(f"width_mult must be a number > 0, got {width_mult!r}")
        ch = round_channels(32 * width_mult)
        last = round_channels(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, ch, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(ch),
                          nn.ReLU6())
        ]
        for t, c, n, s in MOBILENET_V2_SETTINGS:
            out = round_channels(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(ch, out, s if i == 0 else 1, t))
                ch = out
        features.append(nn.Sequential(nn.Conv2d(ch, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(last, num_classes)
        init_weights_(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


@register(
    "mobilenet_v2", family="cifar", input_size=32,
    description="MobileNetV2 (Sandler et al. 2018) for CIFAR: stride-1 stem, ReLU6 inverted residuals with "
    "depthwise 3x3 and linear bottlenecks, ~2.24M params; width_mult option",
)
def mobilenet_v2(
    *, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2, in_channels: int = 3
) -> CifarMobileNetV2:
    return CifarMobileNetV2(num_classes, width_mult, dropout, in_channels=in_channels)
