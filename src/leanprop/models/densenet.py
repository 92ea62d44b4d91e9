"""DenseNet-BC-121 for 32x32 CIFAR images (Huang et al. 2017)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ._options import check_in_channels, check_num_classes
from .registry import register
from .weight_init import init_weights_

__all__ = ["DenseLayer", "DenseBlock", "Transition", "CifarDenseNet", "cifar_densenet121"]


class DenseLayer(nn.Module):
    """DenseNet-BC composite layer: BN-ReLU-conv1x1 (bottleneck) then BN-ReLU-conv3x3 (growth).

    Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional Networks", CVPR 2017.
    Returns only the ``growth`` new feature maps; :class:`DenseBlock` does the concatenation.
    """

    def __init__(self, in_channels: int, growth: int, bn_size: int = 4):
        super().__init__()
        inter = bn_size * growth
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_channels, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(inter, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        return self.conv2(self.relu2(self.bn2(out)))


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; each sees the concatenation of the block input and all earlier
    layers' outputs (Huang et al. 2017).  Output channels: ``in_channels + num_layers * growth``."""

    def __init__(self, num_layers: int, in_channels: int, growth: int, bn_size: int = 4):
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = DenseLayer(in_channels + i * growth, growth, bn_size)
        self.out_channels = in_channels + num_layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Module):
    """DenseNet-BC transition: BN-ReLU-conv1x1 (compression) then 2x2 average pooling (Huang et al. 2017)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=False)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class CifarDenseNet(nn.Module):
    """DenseNet-BC for CIFAR: 3x3 stem conv with ``2 * growth`` channels (no stem pooling), dense
    blocks separated by compressing transitions, final BN-ReLU, global average pooling, linear.

    Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional Networks", CVPR 2017
    (the "BC" variant: 1x1 bottlenecks with ``4 * growth`` channels and compression 0.5).
    """

    def __init__(
        self,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        growth: int = 32,
        num_classes: int = 10,
        compression: float = 0.5,
        bn_size: int = 4,
        in_channels: int = 3,
    ):
        super().__init__()
        check_num_classes(num_classes)
        check_in_channels(in_channels)
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression!r}")
        ch = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        for i, n in enumerate(block_config):
            block = DenseBlock(n, ch, growth, bn_size)
            stages[f"denseblock{i + 1}"] = block
            ch = block.out_channels
            if i < len(block_config) - 1:
                out = int(ch * compression)
                stages[f"transition{i + 1}"] = Transition(ch, out)
                ch = out
        self.features = nn.Sequential(stages)
        self.bn_final = nn.BatchNorm2d(ch)
        self.relu_final = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.conv1(x))
        x = self.relu_final(self.bn_final(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register(
    "cifar_densenet121", family="cifar", input_size=32,
    description="DenseNet-BC-121 for CIFAR (Huang et al. 2017), growth 32, 3x3 stem, 6.96M params",
)
def cifar_densenet121(*, num_classes: int = 10, in_channels: int = 3) -> CifarDenseNet:
    return CifarDenseNet((6, 12, 24, 16), 32, num_classes, in_channels=in_channels)
