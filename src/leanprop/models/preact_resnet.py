"""Pre-activation ResNets (He et al. 2016, "Identity Mappings in Deep Residual Networks").

Every residual branch is written as explicit ``bnK -> reluK -> convK`` submodules, registered and
called in that order, so BN->ReLU->Conv runs can be found by walking the module tree.

Shortcut conventions (``shortcut=`` option):

* ``"projection"`` (default): a 1x1 convolution (no BN) wherever the shape changes.  As in the
  authors' reference code, the first block of every stage applies its BN->ReLU *before* the split
  into the two paths, so its shortcut (projection or identity) also sees the pre-activated input;
  all other blocks have identity shortcuts on the raw input.
* ``"pad"``: the parameter-free shortcut of the BLPA reference implementation (Chakrabarti &
  Moseley, "Backprop with Approximate Activations for Memory-efficient Network Training",
  NeurIPS 2019): average pooling with the block's stride, then symmetric zero padding of the
  channels.  Following that code, the very first block's shortcut sees the pre-activated input
  (the stem's activation), while the stride-2 stage transitions pool the raw (un-normalised)
  input.  There are no shortcut weights, so the parameter count is lower than with projections.
"""

from __future__ import annotations

import torch
from torch import nn

from ._options import check_choice, check_in_channels, check_num_classes
from .registry import register
from .shortcuts import ZeroPadShortcut
from .weight_init import init_weights_

__all__ = [
    "PreActBasicBlock",
    "PreActBottleneck",
    "PreActResNetCifar",
    "PreActResNetImageNet",
    "SHORTCUT_MODES",
]

SHORTCUT_MODES = ("projection", "pad")


def _make_shortcut(in_channels: int, out_channels: int, stride: int, mode: str) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if mode == "projection":
        return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
    return ZeroPadShortcut(in_channels, out_channels, stride, downsample="avg")


class _PreActBlock(nn.Module):
    """Common constructor logic of the pre-activation blocks.

    ``preact=False`` drops the block's leading BN->ReLU (used right after a stem that already
    ends in BN->ReLU(->max-pool), as in the paper's ImageNet design).  ``shortcut_from_preact``
    feeds the shortcut with the pre-activated input instead of the raw one.
    """

    def _init_shortcut(
        self, in_channels: int, out_channels: int, stride: int, mode: str, shortcut_from_preact: bool
    ) -> None:
        self.shortcut = _make_shortcut(in_channels, out_channels, stride, mode)
        self.shortcut_from_preact = bool(shortcut_from_preact)

    def _preact_conv1(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(conv1(a), a)`` with ``a = relu1(bn1(x))`` (or ``x`` without pre-activation).

        When BLPA fused bn1->relu1->conv1 and ``a`` also feeds the shortcut, the fused unit returns both
        (``unit_with_activation``), so ``a`` is never stored for backward.
        """
        if self.preact and self.shortcut_from_preact and getattr(self.bn1, "fuses_conv", False):
            return self.bn1.unit_with_activation(x)
        a = self.relu1(self.bn1(x)) if self.preact else x
        return self.conv1(a), a


class PreActBasicBlock(_PreActBlock):
    """Pre-activation basic unit: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut, no ReLU after the add.

    He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016, Fig. 4(e).
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        shortcut: str = "projection",
        shortcut_from_preact: bool = False,
        preact: bool = True,
    ):
        super().__init__()
        out_channels = planes * self.expansion
        self.preact = bool(preact)
        if self.preact:
            self.bn1 = nn.BatchNorm2d(in_channels)
            self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, out_channels, 3, stride=1, padding=1, bias=False)
        self._init_shortcut(in_channels, out_channels, stride, shortcut, shortcut_from_preact)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, a = self._preact_conv1(x)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + self.shortcut(a if self.shortcut_from_preact else x)

    def blpa_units(self) -> list[tuple[str, str, str | None]]:
        """BN->ReLU->Conv runs for BLPA (see leanprop.blpa.controller.find_units)."""
        return _block_units(self, ("conv1", "conv2"))


def _block_units(block: _PreActBlock, convs: tuple[str, ...]) -> list[tuple[str, str, str | None]]:
    """``bnK -> reluK -> convK`` for each K. When the first run's output also feeds the shortcut, the block
    asks the fused unit for it (``_preact_conv1``); a projection shortcut conv still saves it itself."""
    return [(f"bn{k}", f"relu{k}", conv) for k, conv in enumerate(convs, start=1) if k > 1 or block.preact]


class PreActBottleneck(_PreActBlock):
    """Pre-activation bottleneck: BN-ReLU-conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1 (x4 channels).

    He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016 (ResNet-164 on
    CIFAR, ResNet-152/200 on ImageNet).  The stride sits on the 3x3 convolution.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        shortcut: str = "projection",
        shortcut_from_preact: bool = False,
        preact: bool = True,
    ):
        super().__init__()
        out_channels = planes * self.expansion
        self.preact = bool(preact)
        if self.preact:
            self.bn1 = nn.BatchNorm2d(in_channels)
            self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu3 = nn.ReLU(inplace=False)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self._init_shortcut(in_channels, out_channels, stride, shortcut, shortcut_from_preact)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, a = self._preact_conv1(x)
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        return out + self.shortcut(a if self.shortcut_from_preact else x)

    def blpa_units(self) -> list[tuple[str, str, str | None]]:
        """BN->ReLU->Conv runs for BLPA (see leanprop.blpa.controller.find_units)."""
        return _block_units(self, ("conv1", "conv2", "conv3"))


def _make_stages(
    block: type[PreActBasicBlock | PreActBottleneck],
    in_channels: int,
    planes: tuple[int, ...],
    blocks: tuple[int, ...],
    strides: tuple[int, ...],
    shortcut: str,
    first_block_preact: bool,
) -> tuple[list[nn.Sequential], int]:
    stages = []
    for s, (p, n, stride) in enumerate(zip(planes, blocks, strides, strict=True)):
        layer = []
        for i in range(n):
            first_of_net = s == 0 and i == 0
            if shortcut == "projection":
                from_preact = i == 0
            else:  # "pad": only the first block of the network pads the pre-activated input
                from_preact = first_of_net
            layer.append(
                block(
                    in_channels,
                    p,
                    stride if i == 0 else 1,
                    shortcut=shortcut,
                    shortcut_from_preact=from_preact,
                    preact=first_block_preact or not first_of_net,
                )
            )
            in_channels = p * block.expansion
        stages.append(nn.Sequential(*layer))
    return stages, in_channels


class PreActResNetCifar(nn.Module):
    """CIFAR pre-activation ResNet: 3x3 conv (16), three stages (16/32/64 planes, stride 1/2/2),
    final BN-ReLU, global average pooling and a linear classifier.

    He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016.  The stem is a
    bare convolution; the first block's BN-ReLU acts as the "activation right after conv1" of
    the paper's appendix.  See the module docstring for the ``shortcut`` options.  With
    ``shortcut="pad"`` there are no shortcut weights, so the parameter count is smaller than the
    default projection variant's (e.g. ResNet-164: 1.66M instead of 1.70M).
    """

    def __init__(
        self,
        block: type[PreActBasicBlock | PreActBottleneck],
        n: int,
        num_classes: int = 10,
        shortcut: str = "projection",
        planes: tuple[int, int, int] = (16, 32, 64),
        in_channels: int = 3,
    ):
        super().__init__()
        check_num_classes(num_classes)
        check_in_channels(in_channels)
        check_choice("shortcut", shortcut, SHORTCUT_MODES)
        if n < 1:
            raise ValueError(f"n (blocks per stage) must be >= 1, got {n!r}")
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
        stages, ch = _make_stages(block, planes[0], planes, (n, n, n), (1, 2, 2), shortcut, True)
        self.layer1, self.layer2, self.layer3 = stages
        self.bn_final = nn.BatchNorm2d(ch)
        self.relu_final = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        init_weights_(self)

    def blpa_units(self) -> list[tuple[str, str, str | None]]:
        """The final BN->ReLU feeds the pooling head: a half unit for BLPA."""
        return [("bn_final", "relu_final", None)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu_final(self.bn_final(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class PreActResNetImageNet(nn.Module):
    """ImageNet pre-activation ResNet: 7x7/2 conv (64), BN-ReLU, 3x3/2 max-pool, four stages of
    pre-activation bottlenecks (64/128/256/512 planes x4), final BN-ReLU, global pooling, linear.

    He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016.  Because the
    stem already ends in BN-ReLU (+max-pool), the first block of ``layer1`` has no BN-ReLU of its
    own (``preact=False``: it starts with ``conv1``), as in the paper's appendix and reference
    code.  ``shortcut="pad"`` gives the parameter-free BLPA variant.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        shortcut: str = "projection",
        in_channels: int = 3,
    ):
        super().__init__()
        check_num_classes(num_classes)
        check_in_channels(in_channels)
        check_choice("shortcut", shortcut, SHORTCUT_MODES)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages, ch = _make_stages(
            PreActBottleneck, 64, (64, 128, 256, 512), tuple(layers), (1, 2, 2, 2), shortcut, False
        )
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn_final = nn.BatchNorm2d(ch)
        self.relu_final = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        init_weights_(self)

    def blpa_units(self) -> list[tuple[str, str, str | None]]:
        """Stem BN->ReLU (feeds the max-pool) and the final BN->ReLU (feeds the pooling head): half units."""
        return [("bn1", "relu", None), ("bn_final", "relu_final", None)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.relu_final(self.bn_final(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register(
    "preact_resnet8", family="cifar", input_size=32,
    description="Pre-activation ResNet-8 for CIFAR (one basic block per stage), the CPU-budget model of the "
    "BLPA accuracy table; shortcut='pad' for BLPA",
)
def preact_resnet8(
    *, num_classes: int = 10, shortcut: str = "projection", in_channels: int = 3
) -> PreActResNetCifar:
    return PreActResNetCifar(PreActBasicBlock, 1, num_classes, shortcut, in_channels=in_channels)


@register(
    "preact_resnet20", family="cifar", input_size=32,
    description="Pre-activation ResNet-20 for CIFAR (He et al. 2016, Identity Mappings); "
    "shortcut='pad' for BLPA",
)
def preact_resnet20(
    *, num_classes: int = 10, shortcut: str = "projection", in_channels: int = 3
) -> PreActResNetCifar:
    return PreActResNetCifar(PreActBasicBlock, 3, num_classes, shortcut, in_channels=in_channels)


@register(
    "preact_resnet56", family="cifar", input_size=32,
    description="Pre-activation ResNet-56 for CIFAR (He et al. 2016, Identity Mappings); "
    "shortcut='pad' for BLPA",
)
def preact_resnet56(
    *, num_classes: int = 10, shortcut: str = "projection", in_channels: int = 3
) -> PreActResNetCifar:
    return PreActResNetCifar(PreActBasicBlock, 9, num_classes, shortcut, in_channels=in_channels)


@register(
    "preact_resnet164", family="cifar", input_size=32,
    description="Pre-activation bottleneck ResNet-164 for CIFAR (He et al. 2016), ~1.70M params; "
    "shortcut='pad' for BLPA",
)
def preact_resnet164(
    *, num_classes: int = 10, shortcut: str = "projection", in_channels: int = 3
) -> PreActResNetCifar:
    return PreActResNetCifar(PreActBottleneck, 18, num_classes, shortcut, in_channels=in_channels)


@register(
    "preact_resnet152", family="imagenet", input_size=224,
    description="Pre-activation bottleneck ResNet-152 for ImageNet (He et al. 2016, Identity Mappings)",
)
def preact_resnet152(
    *, num_classes: int = 1000, shortcut: str = "projection", in_channels: int = 3
) -> PreActResNetImageNet:
    return PreActResNetImageNet((3, 8, 36, 3), num_classes, shortcut, in_channels=in_channels)
