"""Wide residual networks for CIFAR (Zagoruyko & Komodakis 2016): WRN-16-8 and WRN-28-10."""

from __future__ import annotations

import torch
from torch import nn

from ._options import check_dropout, check_in_channels, check_num_classes
from .registry import register
from .weight_init import init_weights_

__all__ = ["WideBasicBlock", "WideResNet", "wrn16_8", "wrn28_10"]


class WideBasicBlock(nn.Module):
    """Pre-activation wide block with dropout: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 + shortcut.

    Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016, Fig. 1(d) ("wide-dropout"):
    dropout sits between the two convolutions, after the ReLU.  When the shape changes the
    shortcut is a 1x1 convolution applied to the pre-activated input (as in the authors' code);
    otherwise it is the identity on the raw input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.3):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut_from_preact = stride != 1 or in_channels != out_channels
        if self.shortcut_from_preact:
            self.shortcut: nn.Module = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.bn1(x))
        out = self.conv1(a)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + self.shortcut(a if self.shortcut_from_preact else x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: 3x3 conv (16), three groups of ``(depth - 4) / 6`` wide blocks with
    16k/32k/64k channels (stride 1/2/2), final BN-ReLU, global average pooling, linear.

    Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
    """

    def __init__(self, depth: int, widen: int, num_classes: int = 10, dropout: float = 0.3, in_channels: int = 3):
        super().__init__()
        check_num_classes(num_classes)
        check_in_channels(in_channels)
        dropout = check_dropout("dropout", dropout)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth!r}")
        if widen < 1:
            raise ValueError(f"widen factor must be >= 1, got {widen!r}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        in_ch = 16
        stages = []
        for i, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(WideBasicBlock(in_ch, width, stride, dropout))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn_final = nn.BatchNorm2d(in_ch)
        self.relu_final = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu_final(self.bn_final(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register(
    "wrn16_8", family="cifar", input_size=32,
    description="Wide ResNet WRN-16-8 (Zagoruyko & Komodakis 2016), dropout 0.3, 11.0M params",
)
def wrn16_8(*, num_classes: int = 10, dropout: float = 0.3, in_channels: int = 3) -> WideResNet:
    return WideResNet(16, 8, num_classes, dropout, in_channels=in_channels)


@register(
    "wrn28_10", family="cifar", input_size=32,
    description="Wide ResNet WRN-28-10 (Zagoruyko & Komodakis 2016), dropout 0.3, 36.5M params",
)
def wrn28_10(*, num_classes: int = 10, dropout: float = 0.3, in_channels: int = 3) -> WideResNet:
    return WideResNet(28, 10, num_classes, dropout, in_channels=in_channels)
