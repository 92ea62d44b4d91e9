"""Tests for the model zoo (``leanprop.models``): registry, parameter counts, layouts, forward/backward.

Structural checks build models on the ``meta`` device (no memory, no init cost); only the
forward/backward test runs real computation, on 2 tiny images per model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from leanprop import models
from leanprop.models import registry
from leanprop.models.densenet import DenseLayer, Transition
from leanprop.models.imagenet_resnet import BasicBlock, Bottleneck
from leanprop.models.preact_resnet import PreActBasicBlock, PreActBottleneck
from leanprop.models.shortcuts import ZeroPadShortcut
from leanprop.models.wide_resnet import WideBasicBlock

ALL_MODELS = [
    "resnet8", "resnet20", "resnet32", "resnet56",
    "cifar_resnet18", "cifar_resnet34", "cifar_resnet50",
    "preact_resnet8", "preact_resnet20", "preact_resnet56", "preact_resnet164",
    "cifar_vgg16", "wrn16_8", "wrn28_10", "cifar_densenet121",
    "mobilenet_v2", "efficientnet_b0", "convnext_atto",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d",
    "preact_resnet152",
]  # fmt: skip

IMAGENET_MODELS = {
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d",
    "preact_resnet152",
}  # fmt: skip

# Exact parameter counts (default num_classes).  ImageNet values are torchvision's published
# counts; the CIFAR ResNet-18/34/50 values are the standard 3x3-stem CIFAR adaptation.
EXACT_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "wide_resnet50_2": 68_883_240,
    "resnext50_32x4d": 25_028_904,
    "cifar_resnet18": 11_173_962,
    "cifar_resnet34": 21_282_122,
    "cifar_resnet50": 23_520_842,
    # ResNet-8 (n=1): 3x3 convs 3->16, 16->16 x2, 16->32, 32->32, 32->64, 64->64; 7 BNs of 16/16/16/32/32/64/64
    "resnet8": (3 * 16 + 2 * 16 * 16 + 16 * 32 + 32 * 32 + 32 * 64 + 64 * 64) * 9
    + 2 * (16 * 3 + 32 * 2 + 64 * 2) + 650,
    # MobileNetV2 / EfficientNet-B0: the published ImageNet counts (3,504,872 and 5,288,548; the CIFAR stems
    # only change a stride) less the 1000-class classifier, plus a 10-class one on the 1280 features.
    "mobilenet_v2": 3_504_872 - 1281 * 1000 + 1281 * 10,
    "efficientnet_b0": 5_288_548 - 1281 * 1000 + 1281 * 10,
}


def _convnext_params(depths, dims, in_channels=3, num_classes=10, stem=2):
    """ConvNeXt: stem conv + LN; per block dwconv 7x7 (+bias), LN, Linear d->4d, Linear 4d->d, layer scale;
    downsampling LN + 2x2 conv; final LN + linear."""
    n = in_channels * dims[0] * stem * stem + dims[0] + 2 * dims[0]
    for i, (depth, d) in enumerate(zip(depths, dims, strict=True)):
        if i:
            n += 2 * dims[i - 1] + 4 * dims[i - 1] * d + d
        n += depth * (49 * d + d + 2 * d + 4 * d * d + 4 * d + 4 * d * d + d + d)
    return n + 2 * dims[-1] + dims[-1] * num_classes + num_classes


# With the paper's 4x4 stem and 1000 classes this is the 3.70M usually reported for ConvNeXt-atto.
EXACT_PARAMS["convnext_atto"] = _convnext_params((2, 2, 6, 2), (40, 80, 160, 320))

# Approximate counts from the papers / common reports, checked to within 1 %.
APPROX_PARAMS = {
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet56": 0.85e6,
    "preact_resnet164": 1.70e6,
    "cifar_vgg16": 33.6e6,
    "wrn16_8": 11.0e6,
    "wrn28_10": 36.5e6,
    "cifar_densenet121": 6.96e6,
}

PREACT_MODELS = [
    "preact_resnet20", "preact_resnet56", "preact_resnet164", "preact_resnet152",
    "wrn16_8", "wrn28_10", "cifar_densenet121",
]  # fmt: skip
PREACT_RESNET_BLOCKS = (PreActBasicBlock, PreActBottleneck)
PREACT_BLOCKS = (*PREACT_RESNET_BLOCKS, WideBasicBlock, DenseLayer, Transition)


pytestmark = pytest.mark.usefixtures("one_thread_module")


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return models.create(name, **kwargs)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def input_size(name: str, real: bool) -> int:
    # ImageNet models run real computation at 64x64 (adaptive pooling makes any size >= 32 work).
    if models.model_info(name).family == "imagenet":
        return 64 if real else 224
    return 32


# --------------------------------------------------------------------------------------- registry


def test_list_models_contains_all_names():
    names = models.list_models()
    assert set(ALL_MODELS) <= set(names)
    assert names == sorted(names)
    cifar, imagenet = models.list_models("cifar"), models.list_models("imagenet")
    assert set(cifar) | set(imagenet) == set(names) and not set(cifar) & set(imagenet)
    assert IMAGENET_MODELS <= set(imagenet)
    with pytest.raises(ValueError, match="family"):
        models.list_models("mnist")


def test_model_info():
    info = models.model_info("resnet50")
    assert isinstance(info, models.ModelInfo)
    assert (info.name, info.family, info.input_size) == ("resnet50", "imagenet", 224)
    assert info.description
    assert models.model_info("resnet20").input_size == 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "x"  # type: ignore[misc]
    for name in ALL_MODELS:
        info = models.model_info(name)
        assert info.family == ("imagenet" if name in IMAGENET_MODELS else "cifar")
        assert info.input_size == (224 if name in IMAGENET_MODELS else 32)


def test_unknown_name_suggests_closest():
    with pytest.raises(ValueError, match="resnet20") as exc:
        models.create("resnet2O")
    msg = str(exc.value)
    assert "Did you mean 'resnet20'" in msg
    assert "wrn28_10" in msg  # the available names are listed
    with pytest.raises(ValueError, match="Did you mean 'resnet50'"):
        models.model_info("ResNet50")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        models.create("resnet20", num_classes=bad)


def test_bad_kwargs():
    with pytest.raises(ValueError, match="unexpected option.*conv_bias"):
        models.create("resnet20", conv_bias=True)
    with pytest.raises(ValueError, match="accepted options: conv_bias"):
        models.create("cifar_resnet18", convbias=True)
    with pytest.raises(ValueError, match="shortcut"):
        models.create("preact_resnet20", shortcut="zeros")
    with pytest.raises(ValueError, match="conv_bias"):
        models.create("cifar_resnet18", conv_bias=1)
    with pytest.raises(ValueError, match="dropout"):
        models.create("wrn16_8", dropout=1.5)
    with pytest.raises(ValueError, match="zero_init_residual"):
        models.create("resnet18", zero_init_residual="yes")


def test_default_and_custom_num_classes():
    assert meta_model("resnet20").fc.out_features == 10
    assert meta_model("resnet18").fc.out_features == 1000
    assert meta_model("cifar_vgg16", num_classes=100).classifier[-1].out_features == 100
    assert meta_model("resnet50", num_classes=7).fc.out_features == 7


def test_register_validation(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @models.register("tiny_test_net", family="cifar", input_size=32, description="test only")
    def tiny(*, num_classes: int = 10, in_channels: int = 3, width: int = 4) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(width, num_classes))

    assert "tiny_test_net" in models.list_models("cifar")
    assert models.create("tiny_test_net", width=2)[-1].out_features == 10
    assert models.create("tiny_test_net", in_channels=1)[0].in_channels == 1
    with pytest.raises(ValueError, match="already registered"):
        models.register("tiny_test_net", family="cifar", input_size=32, description="x")(tiny)
    with pytest.raises(ValueError, match="family"):
        models.register("a", family="mnist", input_size=32, description="x")
    with pytest.raises(ValueError, match="input_size"):
        models.register("a", family="imagenet", input_size=32, description="x")
    with pytest.raises(TypeError, match="num_classes"):
        models.register("b", family="cifar", input_size=32, description="x")(lambda: nn.Identity())
    with pytest.raises(TypeError, match="in_channels"):  # every model must follow the data's channels
        models.register("c", family="cifar", input_size=32, description="x")(lambda *, num_classes: nn.Identity())


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", models.list_models())
def test_every_model_takes_in_channels(name):
    """Grayscale data: ``in_channels=1`` changes the stem conv only (its weight loses 2 of 3 input planes), and a
    (2, 1, H, W) batch goes through (shape propagation on the meta device: no compute)."""
    rgb, gray = meta_model(name), meta_model(name, in_channels=1)
    stem = _first_conv(gray)
    assert stem.in_channels == 1 and _first_conv(rgb).in_channels == 3
    assert n_params(rgb) - n_params(gray) == 2 * stem.weight[0, 0].numel() * stem.out_channels
    s = input_size(name, real=True)
    out = gray(torch.empty(2, 1, s, s, device="meta"))
    assert out.shape == (2, models.model_info(name).default_num_classes)
    with pytest.raises(ValueError, match="in_channels"):
        models.create(name, in_channels=0)


@pytest.mark.parametrize("name", ["resnet8", "preact_resnet8"])
def test_grayscale_forward_backward(name):
    torch.manual_seed(0)
    model = models.create(name, num_classes=3, in_channels=1)
    out = model(torch.randn(2, 1, 16, 16))
    out.sum().backward()
    assert out.shape == (2, 3) and _first_conv(model).weight.grad.shape[1] == 1


# ------------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_exact_param_counts(name):
    assert n_params(meta_model(name)) == EXACT_PARAMS[name]


@pytest.mark.parametrize("name", sorted(APPROX_PARAMS))
def test_approx_param_counts(name):
    assert n_params(meta_model(name)) == pytest.approx(APPROX_PARAMS[name], rel=0.01)


def test_cifar_resnet18_conv_bias():
    plain, biased = meta_model("cifar_resnet18"), meta_model("cifar_resnet18", conv_bias=True)
    convs = [m for m in biased.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.bias is not None for m in convs)
    assert all(m.bias is None for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert n_params(biased) == 11_173_962 + sum(m.out_channels for m in convs) == 11_178_762


def test_pad_shortcut_variants_have_no_shortcut_weights():
    # Basic-block pre-activation nets with parameter-free shortcuts have exactly the weights of
    # the post-activation option-A ResNets (same convs, same number of BN layers, same fc).
    assert n_params(meta_model("preact_resnet20", shortcut="pad")) == n_params(meta_model("resnet20"))
    assert n_params(meta_model("preact_resnet56", shortcut="pad")) == n_params(meta_model("resnet56"))
    for name in ("preact_resnet20", "preact_resnet56", "preact_resnet164", "preact_resnet152"):
        proj, pad = meta_model(name), meta_model(name, shortcut="pad")
        proj_weights = sum(
            m.weight.numel() for b in proj.modules() if isinstance(b, PREACT_RESNET_BLOCKS)
            for m in [b.shortcut] if isinstance(m, nn.Conv2d)
        )
        assert proj_weights > 0
        assert n_params(proj) - n_params(pad) == proj_weights
        pad_blocks = [b for b in pad.modules() if isinstance(b, PREACT_RESNET_BLOCKS)]
        assert not any(isinstance(b.shortcut, nn.Conv2d) for b in pad_blocks)
        assert any(isinstance(m, ZeroPadShortcut) for m in pad.modules())


def test_mobile_efficient_convnext_options():
    from leanprop.models.convnext import ConvNeXtBlock
    from leanprop.models.efficientnet import MBConv
    from leanprop.models.mobilenet_v2 import round_channels

    assert [round_channels(c) for c in (16, 12, 20, 4.5, 1280 * 0.35)] == [16, 16, 24, 8, 448]
    half = meta_model("mobilenet_v2", width_mult=0.5)
    assert n_params(half) < n_params(meta_model("mobilenet_v2")) and half.fc.in_features == 1280
    assert meta_model("mobilenet_v2", width_mult=1.4).fc.in_features == 1792
    assert _first_conv(meta_model("mobilenet_v2")).stride == (1, 1)  # CIFAR stem
    assert _first_conv(meta_model("efficientnet_b0")).stride == (1, 1)
    assert _first_conv(meta_model("convnext_atto")).kernel_size == (2, 2)  # 2x2 patchify
    assert all(b.drop_prob == 0 for b in meta_model("efficientnet_b0").modules() if isinstance(b, MBConv))
    drops = [b.drop_prob for b in meta_model("efficientnet_b0", stochastic_depth=0.2).modules()
             if isinstance(b, MBConv)]
    assert drops[0] == 0 and drops == sorted(drops) and drops[-1] == pytest.approx(0.2 * 15 / 16)
    drops = [b.drop_prob for b in meta_model("convnext_atto", stochastic_depth=0.1).modules()
             if isinstance(b, ConvNeXtBlock)]
    assert len(drops) == 12 and drops[0] == 0 and drops[-1] == pytest.approx(0.1)
    assert all(torch.all(b.gamma == 1e-6) for b in models.create("convnext_atto").modules()
               if isinstance(b, ConvNeXtBlock))
    torch.manual_seed(0)
    m = models.create("efficientnet_b0", stochastic_depth=0.5, dropout=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(m(x), m(x))  # branches dropped at random in training
    for name, bad in [("mobilenet_v2", {"width_mult": 0}), ("mobilenet_v2", {"dropout": 1.0}),
                      ("efficientnet_b0", {"stochastic_depth": -0.1}), ("convnext_atto", {"layer_scale_init": 0}),
                      ("convnext_atto", {"stochastic_depth": 1.0})]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            models.create(name, **bad)


# ------------------------------------------------------------------------------ torchvision names


def torchvision_resnet_spec(bottleneck: bool, layers, groups=1, width_per_group=64, num_classes=1000):
    """Expected torchvision ResNet state_dict {key: shape}, generated from the architecture."""
    spec: dict[str, tuple[int, ...]] = {}

    def conv(key, cout, cin, k):
        spec[f"{key}.weight"] = (cout, cin, k, k)

    def bn(key, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            spec[f"{key}.{p}"] = (c,)
        spec[f"{key}.num_batches_tracked"] = ()

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
        for b in range(n):
            pre = f"layer{li + 1}.{b}"
            if bottleneck:
                width = int(planes * width_per_group / 64) * groups
                out = planes * 4
                conv(f"{pre}.conv1", width, inplanes, 1)
                bn(f"{pre}.bn1", width)
                conv(f"{pre}.conv2", width, width // groups, 3)
                bn(f"{pre}.bn2", width)
                conv(f"{pre}.conv3", out, width, 1)
                bn(f"{pre}.bn3", out)
            else:
                out = planes
                conv(f"{pre}.conv1", out, inplanes, 3)
                bn(f"{pre}.bn1", out)
                conv(f"{pre}.conv2", out, out, 3)
                bn(f"{pre}.bn2", out)
            if b == 0 and (li > 0 or inplanes != out):
                conv(f"{pre}.downsample.0", out, inplanes, 1)
                bn(f"{pre}.downsample.1", out)
            inplanes = out
    spec["fc.weight"] = (num_classes, inplanes)
    spec["fc.bias"] = (num_classes,)
    return spec


TORCHVISION_SPECS = {
    "resnet18": dict(bottleneck=False, layers=(2, 2, 2, 2)),
    "resnet34": dict(bottleneck=False, layers=(3, 4, 6, 3)),
    "resnet50": dict(bottleneck=True, layers=(3, 4, 6, 3)),
    "resnet101": dict(bottleneck=True, layers=(3, 4, 23, 3)),
    "resnet152": dict(bottleneck=True, layers=(3, 8, 36, 3)),
    "wide_resnet50_2": dict(bottleneck=True, layers=(3, 4, 6, 3), width_per_group=128),
    "resnext50_32x4d": dict(bottleneck=True, layers=(3, 4, 6, 3), groups=32, width_per_group=4),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_SPECS))
def test_torchvision_state_dict_layout(name):
    got = {k: tuple(v.shape) for k, v in meta_model(name).state_dict().items()}
    expected = torchvision_resnet_spec(**TORCHVISION_SPECS[name])
    assert set(got) == set(expected)
    assert got == expected


def test_torchvision_key_examples_and_counts():
    keys = set(meta_model("resnet50").state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight",
              "layer1.0.downsample.1.num_batches_tracked", "layer4.2.conv3.weight", "fc.bias"):
        assert k in keys
    # resnet18: 62 parameter tensors + 20 BN layers x 3 buffers = 122 entries.
    sd = meta_model("resnet18").state_dict()
    assert len(sd) == 122
    assert len(list(meta_model("resnet18").parameters())) == 62


def test_resnet18_loads_torchvision_shaped_checkpoint_strictly():
    spec = torchvision_resnet_spec(bottleneck=False, layers=(2, 2, 2, 2))
    ckpt = {k: torch.zeros(s, dtype=torch.long if k.endswith("num_batches_tracked") else torch.float32)
            for k, s in spec.items()}
    model = models.create("resnet18")
    result = model.load_state_dict(ckpt, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_zero_init_residual_and_init():
    m = models.create("resnet50", zero_init_residual=True)
    assert all(torch.all(b.bn3.weight == 0) for b in m.modules() if isinstance(b, Bottleneck))
    m = models.create("resnet18", zero_init_residual=True)
    assert all(torch.all(b.bn2.weight == 0) for b in m.modules() if isinstance(b, BasicBlock))
    m = models.create("resnet18")
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)
    w = m.layer4[1].conv2.weight  # kaiming normal, fan_out = 512 * 9
    assert w.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.05)
    vgg = models.create("cifar_vgg16")
    assert vgg.classifier[3].weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(vgg.classifier[3].bias == 0)


# ----------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("name", ALL_MODELS)
def test_meta_forward_at_native_resolution(name):
    model = meta_model(name, num_classes=7).eval()
    s = input_size(name, real=False)
    assert model(torch.empty(2, 3, s, s, device="meta")).shape == (2, 7)


def _record_leaf_calls(model: nn.Module):
    calls: list[str] = []
    handles = [
        m.register_forward_hook(lambda mod, inp, out, n=n: calls.append(n))
        for n, m in model.named_modules() if not list(m.children())
    ]
    return calls, handles


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = models.create(name)
    num_classes = models.model_info(name).default_num_classes
    s = input_size(name, real=True)
    x = torch.randn(2, 3, s, s)

    model.train()
    calls, handles = _record_leaf_calls(model)
    out = model(x)
    for h in handles:
        h.remove()
    assert out.shape == (2, num_classes)
    # Every leaf module runs exactly once, in registration order (no shared modules).
    leaves = [n for n, m in model.named_modules() if not list(m.children())]
    assert calls == leaves
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y1 = model(x[:1])
        y2 = model(x[:1])
    assert y1.shape == (1, num_classes)
    assert torch.equal(y1, y2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# The activation each family uses: MobileNetV2 ReLU6, EfficientNet SiLU, ConvNeXt GELU, the rest ReLU.
ACTIVATION = {"mobilenet_v2": nn.ReLU6, "efficientnet_b0": nn.SiLU, "convnext_atto": nn.GELU}


def test_layer_types_are_real_modules():
    # Activations are modules (never functional), non-inplace; convs/linears are plain nn modules.
    for name in ALL_MODELS:
        model = meta_model(name)
        acts = [m for m in model.modules() if isinstance(m, ACTIVATION.get(name, nn.ReLU))]
        assert acts and all(not getattr(m, "inplace", False) for m in acts)
        assert any(type(m) is nn.Conv2d for m in model.modules())
        assert any(type(m) is nn.Linear for m in model.modules())


# ------------------------------------------------------------------------- pre-activation layout


def _block_children(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_children() if not isinstance(m, nn.Dropout)]


def _check_bn_relu_conv_order(block: nn.Module) -> bool:
    """Every ``convK`` with a ``bnK`` is directly preceded by ``bnK, reluK``; returns whether the
    block has a leading BN-ReLU (``bn1``/``bn``)."""
    names = _block_children(block)
    for i, n in enumerate(names):
        if n.startswith("conv"):
            k = n[len("conv"):]
            if hasattr(block, f"bn{k}"):
                assert names[i - 2: i] == [f"bn{k}", f"relu{k}"], (type(block).__name__, names)
                assert isinstance(getattr(block, f"bn{k}"), nn.BatchNorm2d)
                assert isinstance(getattr(block, f"relu{k}"), nn.ReLU)
                assert isinstance(getattr(block, n), nn.Conv2d)
            else:
                assert not hasattr(block, f"relu{k}")
    return hasattr(block, "bn1") or hasattr(block, "bn")


PREACT_CASES = [(n, {}) for n in PREACT_MODELS] + [
    (n, {"shortcut": "pad"}) for n in PREACT_MODELS if n.startswith("preact_")
]


@pytest.mark.parametrize(("name", "kwargs"), PREACT_CASES, ids=lambda v: v if isinstance(v, str) else str(v))
def test_preact_blocks_bn_relu_conv_order(name, kwargs):
    model = meta_model(name, **kwargs).eval()
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, PREACT_BLOCKS)]
    assert blocks
    without_preact = [n for n, b in blocks if not _check_bn_relu_conv_order(b)]
    # Only the ImageNet net's first block lacks its own BN-ReLU: it follows the BN-ReLU-maxpool stem.
    assert without_preact == (["layer1.0"] if name == "preact_resnet152" else [])

    # Forward calls the block's children in registration order (BN -> ReLU -> Conv ...).
    calls: dict[str, list[str]] = {n: [] for n, _ in blocks}
    handles = []
    for bname, block in blocks:
        for cname, child in block.named_children():
            handles.append(child.register_forward_hook(
                lambda mod, inp, out, b=bname, c=cname: calls[b].append(c)))
    s = input_size(name, real=False)
    model(torch.empty(1, 3, s, s, device="meta"))
    for h in handles:
        h.remove()
    for bname, block in blocks:
        assert calls[bname] == [n for n, _ in block.named_children()], bname


def test_preact_shortcut_inputs():
    # Projection: first block of every stage projects/identity-maps the pre-activated input.
    m = meta_model("preact_resnet164")
    assert [m.layer1[0].shortcut_from_preact, m.layer2[0].shortcut_from_preact] == [True, True]
    assert not m.layer2[1].shortcut_from_preact and isinstance(m.layer2[1].shortcut, nn.Identity)
    assert isinstance(m.layer2[0].shortcut, nn.Conv2d) and m.layer2[0].shortcut.stride == (2, 2)
    assert m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].conv1.stride == (1, 1)
    # BLPA pad: first block of the net pads the pre-activated input, transitions pool the raw input.
    p = meta_model("preact_resnet164", shortcut="pad")
    assert p.layer1[0].shortcut_from_preact and not p.layer2[0].shortcut_from_preact
    assert isinstance(p.layer2[0].shortcut, ZeroPadShortcut) and p.layer2[0].shortcut.pad == 32


def test_zero_pad_shortcut_values():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    avg = ZeroPadShortcut(4, 8, stride=2, downsample="avg")(x)
    assert avg.shape == (2, 8, 2, 2)
    assert torch.equal(avg[:, 2:6], nn.functional.avg_pool2d(x, 2))
    assert torch.all(avg[:, :2] == 0) and torch.all(avg[:, 6:] == 0)
    sub = ZeroPadShortcut(4, 8, stride=2)(x)
    assert torch.equal(sub[:, 2:6], x[:, :, ::2, ::2])
    odd = torch.randn(1, 4, 5, 5)
    assert ZeroPadShortcut(4, 8, 2, "avg")(odd).shape == ZeroPadShortcut(4, 8, 2)(odd).shape == (1, 8, 3, 3)
    with pytest.raises(ValueError):
        ZeroPadShortcut(4, 7)


def test_option_a_resnet_structure():
    m = meta_model("resnet20")
    assert isinstance(m.layer1[0].shortcut, nn.Identity)
    sc = m.layer2[0].shortcut
    assert isinstance(sc, ZeroPadShortcut) and sc.downsample == "subsample" and sc.pad == 8
    assert not any(isinstance(x, nn.Conv2d) and x.kernel_size == (1, 1) for x in m.modules())
