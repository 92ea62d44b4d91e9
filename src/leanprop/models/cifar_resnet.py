"""CIFAR ResNet-20/32/56 of He et al. 2016 with the parameter-free "option A" shortcut."""

from __future__ import annotations

import torch
from torch import nn

from ._options import check_in_channels, check_num_classes
from .registry import register
from .shortcuts import ZeroPadShortcut
from .weight_init import init_weights_

__all__ = ["CifarBasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet56"]


class CifarBasicBlock(nn.Module):
    """Post-activation basic block (conv-BN-ReLU-conv-BN, add, ReLU) with an option-A shortcut.

    He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = ZeroPadShortcut(in_channels, out_channels, stride, "subsample")
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: 3x3 conv (16), three stages of ``n`` basic blocks with 16/32/64
    channels (stride 1/2/2), global average pooling and a linear classifier.

    He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2.
    Dimension increases use option A (strided subsampling plus zero channel padding), so the
    shortcuts have no parameters.
    """

    def __init__(self, n: int, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64),
                 in_channels: int = 3):
        super().__init__()
        check_num_classes(num_classes)
        check_in_channels(in_channels)
        if n < 1:
            raise ValueError(f"n (blocks per stage) must be >= 1, got {n!r}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=False)
        in_ch = widths[0]
        stages = []
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(CifarBasicBlock(in_ch, width, stride))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register(
    "resnet8", family="cifar", input_size=32,
    description="CIFAR ResNet-8 (He et al. 2016 family, n=1), option-A shortcuts, ~0.08M params; "
    "the CPU-budget model of the accuracy tables",
)
def resnet8(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(1, num_classes, in_channels=in_channels)


@register(
    "resnet20", family="cifar", input_size=32,
    description="CIFAR ResNet-20 (He et al. 2016), option-A shortcuts, ~0.27M params",
)
def resnet20(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(3, num_classes, in_channels=in_channels)


@register(
    "resnet32", family="cifar", input_size=32,
    description="CIFAR ResNet-32 (He et al. 2016), option-A shortcuts, ~0.46M params",
)
def resnet32(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(5, num_classes, in_channels=in_channels)


@register(
    "resnet56", family="cifar", input_size=32,
    description="CIFAR ResNet-56 (He et al. 2016), option-A shortcuts, ~0.85M params",
)
def resnet56(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(9, num_classes, in_channels=in_channels)
