"""ImageNet ResNets (v1.5) laid out exactly like torchvision's, so its checkpoints load strictly.

Module and parameter names follow ``torchvision.models.resnet``: ``conv1, bn1, relu, maxpool,
layer1..layer4, avgpool, fc``; blocks hold ``conv1, bn1, conv2, bn2, (conv3, bn3)`` and an
optional ``downsample`` = ``Sequential(1x1 conv, BN)``.  The only difference is that each block
owns one ``nn.ReLU`` per use (``relu1``, ``relu2``, ``relu3``) instead of one shared module
called several times; ReLUs have no state, so ``state_dict`` keys are unaffected.
"""

from __future__ import annotations

import torch
from torch import nn

from ._options import check_bool, check_in_channels, check_num_classes
from .registry import register
from .weight_init import init_weights_

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]


def _projection(in_channels: int, out_channels: int, stride: int, bias: bool) -> nn.Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        groups: int = 1,
        base_width: int = 64,
        conv_bias: bool = False,
    ):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _projection(inplanes, planes, stride, conv_bias)
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck with the stride on the 3x3 convolution (ResNet v1.5).

    He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016; grouped
    variant from Xie et al., "Aggregated Residual Transformations" (ResNeXt), CVPR 2017; wide
    variant from Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        groups: int = 1,
        base_width: int = 64,
        conv_bias: bool = False,
    ):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = nn.Conv2d(width, out_planes, 1, bias=conv_bias)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample = _projection(inplanes, out_planes, stride, conv_bias)
        self.relu3 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)


def make_stage(
    block: type[BasicBlock | Bottleneck],
    inplanes: int,
    planes: int,
    blocks: int,
    stride: int,
    groups: int = 1,
    base_width: int = 64,
    conv_bias: bool = False,
) -> tuple[nn.Sequential, int]:
    """A ``Sequential`` of ``blocks`` residual blocks; returns it and its output channel count."""
    layers = []
    for i in range(blocks):
        layers.append(block(inplanes, planes, stride if i == 0 else 1, groups, base_width, conv_bias))
        inplanes = planes * block.expansion
    return nn.Sequential(*layers), inplanes


def zero_init_last_bn_(model: nn.Module) -> None:
    """Zero the last BN scale of every residual branch (Goyal et al. 2017), so blocks start as identity."""
    for m in model.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)


class ResNet(nn.Module):
    """ImageNet ResNet v1.5: 7x7/2 conv, 3x3/2 max-pool, four stages, global pooling, linear.

    He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, with the
    stride of the bottleneck on its 3x3 convolution ("v1.5", as in torchvision).  The adaptive
    average pool lets the network accept any input of at least 32x32 pixels.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        in_channels: int = 3,
    ):
        super().__init__()
        check_num_classes(num_classes)
        check_in_channels(in_channels)
        check_bool("zero_init_residual", zero_init_residual)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        ch = 64
        self.layer1, ch = make_stage(block, ch, 64, layers[0], 1, groups, width_per_group)
        self.layer2, ch = make_stage(block, ch, 128, layers[1], 2, groups, width_per_group)
        self.layer3, ch = make_stage(block, ch, 256, layers[2], 2, groups, width_per_group)
        self.layer4, ch = make_stage(block, ch, 512, layers[3], 2, groups, width_per_group)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(ch, num_classes)
        init_weights_(self)
        if zero_init_residual:
            zero_init_last_bn_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register(
    "resnet18", family="imagenet", input_size=224,
    description="ResNet-18 (He et al. 2016), torchvision layout, 11.7M params",
)
def resnet18(
    *, num_classes: int = 1000, zero_init_residual: bool = False, in_channels: int = 3
) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, zero_init_residual, in_channels=in_channels)


@register(
    "resnet34", family="imagenet", input_size=224,
    description="ResNet-34 (He et al. 2016), torchvision layout, 21.8M params",
)
def resnet34(
    *, num_classes: int = 1000, zero_init_residual: bool = False, in_channels: int = 3
) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, zero_init_residual, in_channels=in_channels)


@register(
    "resnet50", family="imagenet", input_size=224,
    description="ResNet-50 v1.5 (He et al. 2016), torchvision layout, 25.6M params",
)
def resnet50(
    *, num_classes: int = 1000, zero_init_residual: bool = False, in_channels: int = 3
) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, zero_init_residual, in_channels=in_channels)


@register(
    "resnet101", family="imagenet", input_size=224,
    description="ResNet-101 v1.5 (He et al. 2016), torchvision layout, 44.5M params",
)
def resnet101(
    *, num_classes: int = 1000, zero_init_residual: bool = False, in_channels: int = 3
) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes, zero_init_residual, in_channels=in_channels)


@register(
    "resnet152", family="imagenet", input_size=224,
    description="ResNet-152 v1.5 (He et al. 2016), torchvision layout, 60.2M params",
)
def resnet152(
    *, num_classes: int = 1000, zero_init_residual: bool = False, in_channels: int = 3
) -> ResNet:
    return ResNet(Bottleneck, (3, 8, 36, 3), num_classes, zero_init_residual, in_channels=in_channels)


@register(
    "wide_resnet50_2", family="imagenet", input_size=224,
    description="Wide ResNet-50-2 (Zagoruyko & Komodakis 2016), torchvision layout, 68.9M params",
)
def wide_resnet50_2(
    *, num_classes: int = 1000, zero_init_residual: bool = False, in_channels: int = 3
) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, zero_init_residual, width_per_group=128,
                  in_channels=in_channels)


@register(
    "resnext50_32x4d", family="imagenet", input_size=224,
    description="ResNeXt-50 32x4d (Xie et al. 2017), torchvision layout, 25.0M params",
)
def resnext50_32x4d(
    *, num_classes: int = 1000, zero_init_residual: bool = False, in_channels: int = 3
) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, zero_init_residual, groups=32, width_per_group=4,
                  in_channels=in_channels)
