"""Small CNNs written the way users write them, for testing the methods on code that is not the zoo's.

Not a test file: ``tests/test_user_models.py`` (and any other test) imports it.  Every model is a plain
``nn.Module`` class (not registered in ``leanprop.models``) taking 3x32x32 images to 10 logits, with a few
thousand to ~100k parameters, and each one carries an idiom the zoo avoids:

* ``FunctionalReLUNet``: ``F.relu(self.bn(self.conv(x)))`` in ``forward``, no ReLU modules at all;
* ``SharedReLUNet``: one ``self.relu = nn.ReLU(inplace=True)`` called at several places, post-activation
  residual blocks (BN -> ``out += identity`` -> ReLU) with a 1x1 conv + BN downsample path;
* ``InplaceReLUNet``: ``nn.ReLU(inplace=True)`` modules in ``nn.Sequential``s, max-pooling, dropout before the
  classifier;
* ``MobileNetStyle``: ReLU6, depthwise separable convolutions, inverted residual adds;
* ``EfficientNetStyle``: SiLU, squeeze-excite gated by ``torch.sigmoid``;
* ``ConvNeXtStyle``: depthwise 7x7, LayerNorm after a permute to NHWC, GELU, pointwise ``nn.Linear`` layers;
* ``DenseNetStyle``: BN -> ReLU -> conv layers joined by ``torch.cat``, a BN -> ReLU -> 1x1 conv -> avg-pool
  transition;
* ``PreActStyle``: pre-activation blocks (BN -> ReLU -> conv) written with ``F.relu``, the pre-activated input
  shared by the first conv and the shortcut.

``USER_MODELS`` maps each class name to a zero-argument factory; ``example_batch`` gives a fixed batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FunctionalReLUNet", "SharedReLUNet", "InplaceReLUNet", "MobileNetStyle", "EfficientNetStyle",
    "ConvNeXtStyle", "DenseNetStyle", "PreActStyle", "USER_MODELS", "example_batch",
]  # fmt: skip


# ----------------------------------------------------------------------------------- F.relu in forward
class FunctionalReLUNet(nn.Module):
    """conv -> BN -> ``F.relu`` three times, global average pooling, linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


# ------------------------------------------------------------------- one ReLU module used several times
class BasicBlock(nn.Module):
    """Post-activation residual block with a single ReLU module called twice."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))  # self.relu, first use
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)  # BN -> add
        return self.relu(out)  # the same module again, after the add


class SharedReLUNet(nn.Module):
    """A small post-activation ResNet: stem, two basic blocks (the second with a strided 1x1 downsample)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(16, 16)
        downsample = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.layer2 = BasicBlock(16, 32, stride=2, downsample=downsample)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# ------------------------------------------------------------------------ inplace ReLUs, pool, dropout
class InplaceReLUNet(nn.Module):
    """VGG-like: a Sequential stem, conv blocks of ``nn.ReLU(inplace=True)`` with max-pooling, dropout, linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.features = nn.Sequential(
            nn.Conv2d(16, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(nn.Dropout(p=0.5), nn.Linear(64, num_classes))

    def forward(self, x):
        x = self.features(self.stem(x))
        x = x.mean(dim=(2, 3))
        return self.classifier(x)


# ------------------------------------------------------------------- ReLU6, depthwise, inverted residual
class ConvBNReLU6(nn.Sequential):
    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand_ratio):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            ConvBNReLU6(cin, hidden, kernel_size=1),
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False),  # linear pointwise
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetStyle(nn.Module):
    """MobileNetV2-like: stem, three inverted residual blocks (two with residual adds), 1x1 conv, pool, linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            ConvBNReLU6(3, 16, stride=1),
            InvertedResidual(16, 16, 1, 4),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            ConvBNReLU6(24, 128, kernel_size=1),
        )
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --------------------------------------------------------------------- SiLU + squeeze-excite (sigmoid)
class SqueezeExcite(nn.Module):
    def __init__(self, channels, squeeze):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        s = F.silu(self.fc1(s))
        s = torch.sigmoid(self.fc2(s))
        return x * s


class MBConv(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride, expand_ratio=4):
        super().__init__()
        hidden = cin * expand_ratio
        self.residual = stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel_size, stride, kernel_size // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.SiLU(inplace=True),
        )
        self.se = SqueezeExcite(hidden, max(1, cin // 4))
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.project(self.se(self.depthwise(self.expand(x))))
        if self.residual:
            out = out + x
        return out


class EfficientNetStyle(nn.Module):
    """EfficientNet-like: SiLU stem, MBConv blocks (3x3 and 5x5 depthwise, squeeze-excite), SiLU head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(16, 16, 3, 1), MBConv(16, 24, 5, 2), MBConv(24, 24, 5, 1))
        self.head = nn.Sequential(nn.Conv2d(24, 96, 1, bias=False), nn.BatchNorm2d(96), nn.SiLU())
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(96, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        x = x.flatten(2).mean(-1)
        return self.fc(self.dropout(x))


# ------------------------------------------------------------------ depthwise 7x7 + LayerNorm + GELU
class ChannelsFirstLayerNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim, layer_scale=0.1):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        return shortcut + x


class ConvNeXtStyle(nn.Module):
    """ConvNeXt-like: 4x4 patchify stem + LN, one block at 32 channels, LN + 2x2 downsampling, one block at 64,
    global average pooling, LN, linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, kernel_size=4, stride=4), ChannelsFirstLayerNorm(32))
        self.stage1 = ConvNeXtBlock(32)
        self.downsample = nn.Sequential(ChannelsFirstLayerNorm(32), nn.Conv2d(32, 64, kernel_size=2, stride=2))
        self.stage2 = ConvNeXtBlock(64)
        self.norm = nn.LayerNorm(64, eps=1e-6)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.stage2(self.downsample(self.stage1(self.stem(x))))
        x = self.norm(x.mean([-2, -1]))
        return self.head(x)


# ---------------------------------------------------------------------------- dense concatenation
class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        return self.conv(F.relu(self.norm(x)))


class DenseBlock(nn.Module):
    def __init__(self, num_layers, cin, growth):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth) for i in range(num_layers))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNetStyle(nn.Module):
    """DenseNet-like: stem conv, dense block (3 layers, growth 12), transition (BN, ReLU, 1x1 conv, 2x2
    avg-pool) halving the channels, dense block, final BN-ReLU, pool, linear."""

    def __init__(self, num_classes: int = 10, growth: int = 12):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 24, 3, padding=1, bias=False)
        self.block1 = DenseBlock(3, 24, growth)
        ch = 24 + 3 * growth
        self.transition = nn.Sequential(
            nn.BatchNorm2d(ch), nn.ReLU(inplace=True), nn.Conv2d(ch, ch // 2, 1, bias=False), nn.AvgPool2d(2, 2)
        )
        ch //= 2
        self.block2 = DenseBlock(3, ch, growth)
        ch += 3 * growth
        self.norm_final = nn.BatchNorm2d(ch)
        self.classifier = nn.Linear(ch, num_classes)

    def forward(self, x):
        x = self.block2(self.transition(self.block1(self.conv0(x))))
        x = F.relu(self.norm_final(x))
        x = F.adaptive_avg_pool2d(x, (1, 1)).view(x.size(0), -1)
        return self.classifier(x)


# ------------------------------------------------------------------- pre-activation with F.relu
class PreActBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class PreActStyle(nn.Module):
    """Pre-activation ResNet-like: stem conv, blocks 16 -> 16 -> 32 (strided, 1x1 shortcut on the pre-activated
    input) -> 32, final BN-ReLU, pool, linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = nn.Sequential(PreActBlock(16, 16), PreActBlock(16, 16))
        self.layer2 = nn.Sequential(PreActBlock(16, 32, stride=2), PreActBlock(32, 32))
        self.bn = nn.BatchNorm2d(32)
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer2(self.layer1(out))
        out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, out.size(-1))
        out = out.view(out.size(0), -1)
        return self.linear(out)


USER_MODELS: dict[str, Callable[[], nn.Module]] = {
    cls.__name__: cls
    for cls in (FunctionalReLUNet, SharedReLUNet, InplaceReLUNet, MobileNetStyle, EfficientNetStyle, ConvNeXtStyle,
                DenseNetStyle, PreActStyle)
}


def example_batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed CIFAR-shaped batch: ``n`` standard-normal 3x32x32 images and ``n`` labels in [0, 10), drawn from
    a private generator seeded with ``seed`` (the global RNG is left alone)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y
