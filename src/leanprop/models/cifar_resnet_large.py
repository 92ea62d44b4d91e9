"""ImageNet-style ResNet-18/34/50 adapted to 32x32 CIFAR images (3x3 stride-1 stem, no max-pool).

This is the widely used CIFAR adaptation of He et al. 2016 (e.g. the network SWAT was evaluated
with): the 7x7/2 stem and the max-pool are replaced by one 3x3 stride-1 convolution, so the four
stages see 32, 16, 8 and 4 pixel feature maps.  Dimension changes use 1x1 projection convs + BN.
Module names match the torchvision ResNet (``conv1, bn1, relu, layer1..4, avgpool, fc``).
"""

from __future__ import annotations

import torch
from torch import nn

from ._options import check_bool, check_in_channels, check_num_classes
from .imagenet_resnet import BasicBlock, Bottleneck, make_stage, zero_init_last_bn_
from .registry import register
from .weight_init import init_weights_

__all__ = ["CifarLargeResNet", "cifar_resnet18", "cifar_resnet34", "cifar_resnet50"]


class CifarLargeResNet(nn.Module):
    """ResNet-18/34/50 of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016),
    with a 3x3 stride-1 stem and no max-pool for 32x32 inputs.

    ``conv_bias=True`` gives every convolution (stem, blocks, projections) a bias term, as in
    the official SWAT code (Raihan & Aamodt, "Sparse Weight Activation Training", NeurIPS 2020);
    the default ``False`` is the usual bias-free layout (11,173,962 params for ResNet-18 with
    10 classes).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 10,
        conv_bias: bool = False,
        zero_init_residual: bool = False,
        in_channels: int = 3,
    ):
        super().__init__()
        check_num_classes(num_classes)
        check_in_channels(in_channels)
        check_bool("conv_bias", conv_bias)
        check_bool("zero_init_residual", zero_init_residual)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        ch = 64
        self.layer1, ch = make_stage(block, ch, 64, layers[0], 1, conv_bias=conv_bias)
        self.layer2, ch = make_stage(block, ch, 128, layers[1], 2, conv_bias=conv_bias)
        self.layer3, ch = make_stage(block, ch, 256, layers[2], 2, conv_bias=conv_bias)
        self.layer4, ch = make_stage(block, ch, 512, layers[3], 2, conv_bias=conv_bias)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(ch, num_classes)
        init_weights_(self)
        if zero_init_residual:
            zero_init_last_bn_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register(
    "cifar_resnet18", family="cifar", input_size=32,
    description="ResNet-18 for CIFAR (3x3 stem, no max-pool), 11.17M params; conv_bias=True as in SWAT",
)
def cifar_resnet18(
    *, num_classes: int = 10, conv_bias: bool = False, zero_init_residual: bool = False, in_channels: int = 3
) -> CifarLargeResNet:
    return CifarLargeResNet(BasicBlock, (2, 2, 2, 2), num_classes, conv_bias, zero_init_residual, in_channels)


@register(
    "cifar_resnet34", family="cifar", input_size=32,
    description="ResNet-34 for CIFAR (3x3 stem, no max-pool), 21.3M params; conv_bias=True as in SWAT",
)
def cifar_resnet34(
    *, num_classes: int = 10, conv_bias: bool = False, zero_init_residual: bool = False, in_channels: int = 3
) -> CifarLargeResNet:
    return CifarLargeResNet(BasicBlock, (3, 4, 6, 3), num_classes, conv_bias, zero_init_residual, in_channels)


@register(
    "cifar_resnet50", family="cifar", input_size=32,
    description="ResNet-50 v1.5 for CIFAR (3x3 stem, no max-pool), 23.5M params; conv_bias=True as in SWAT",
)
def cifar_resnet50(
    *, num_classes: int = 10, conv_bias: bool = False, zero_init_residual: bool = False, in_channels: int = 3
) -> CifarLargeResNet:
    return CifarLargeResNet(Bottleneck, (3, 4, 6, 3), num_classes, conv_bias, zero_init_residual, in_channels)
