"""VGG-16 with batch normalisation for 32x32 CIFAR images."""

from __future__ import annotations

import torch
from torch import nn

from ._options import check_dropout, check_in_channels, check_num_classes
from .registry import register
from .weight_init import init_weights_

__all__ = ["CifarVGG", "VGG16_CONFIG", "cifar_vgg16"]

#: Output channels of the 13 convolutions of VGG-16 ("M" = 2x2 max-pool).
VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class CifarVGG(nn.Module):
    """VGG (configuration D = VGG-16) with BatchNorm after every convolution, for CIFAR.

    Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
    ICLR 2015, with BN (Ioffe & Szegedy 2015) after each 3x3 conv.  After five max-pools a 32x32
    input is 1x1x512; the classifier is 512 -> 4096 -> 4096 -> ``num_classes`` with ReLU and
    dropout.  An adaptive average pool before the classifier makes other input sizes (>= 32)
    work too; for 32x32 inputs it is the identity.  Convolutions have biases (as in torchvision's
    ``vgg16_bn``).
    """

    def __init__(
        self,
        config: tuple[int | str, ...] = VGG16_CONFIG,
        num_classes: int = 10,
        dropout: float = 0.5,
        hidden: int = 4096,
        in_channels: int = 3,
    ):
        super().__init__()
        check_num_classes(num_classes)
        check_in_channels(in_channels)
        dropout = check_dropout("dropout", dropout)
        layers: list[nn.Module] = []
        in_ch = in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=False)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(
            nn.Linear(in_ch, hidden),
            nn.ReLU(inplace=False),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=False),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        init_weights_(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


@register(
    "cifar_vgg16", family="cifar", input_size=32,
    description="VGG-16 with BatchNorm for CIFAR, 512-4096-4096 classifier with dropout 0.5, 33.6M params",
)
def cifar_vgg16(*, num_classes: int = 10, dropout: float = 0.5, in_channels: int = 3) -> CifarVGG:
    return CifarVGG(VGG16_CONFIG, num_classes, dropout, in_channels=in_channels)
