"""The methods on models written the way users write them (``tests/user_models.py``) and on the registry's
MobileNetV2 / EfficientNet-B0 / ConvNeXt-atto: forward/backward in train mode, SWAT and lossless BLPA
``convert_`` -> ``revert_`` round trips (state_dict keys kept, the plain model and its outputs restored), and
BLPA at 32 bits giving plain PyTorch's forward bit for bit and its gradients, and BLPA-8/4 gradients within a
cosine of 0.99/0.97 of plain PyTorch's.

BLPA's fused units apply only where ``nn.Sequential`` shows BN -> ReLU (``InplaceReLUNet``, the ``DenseNetStyle``
transition); elsewhere the storage policy's virtual units apply, and the same checks hold.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanprop
from leanprop import models

from .user_models import USER_MODELS, example_batch

REGISTRY_MODELS = ["mobilenet_v2", "efficientnet_b0", "convnext_atto"]
ZOO = [*USER_MODELS, *REGISTRY_MODELS]
# BN -> ReLU(-> Conv) runs that nn.Sequential already shows (InplaceReLUNet: 3 full units + the stem's half unit
# before the max-pool; DenseNetStyle: the transition), so the lossless check below does go through fused units.
MIN_BLPA_UNITS = {"InplaceReLUNet": 4, "DenseNetStyle": 1}


pytestmark = pytest.mark.usefixtures("one_thread_module")


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return USER_MODELS[name]() if name in USER_MODELS else models.create(name)


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One training-mode forward and backward; the global RNG is reseeded so dropout draws the same masks."""
    model.train()
    torch.manual_seed(1)
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach()


def module_types(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


def snapshot(name: str) -> tuple[nn.Module, nn.Module, list[str], list[tuple[str, type]], dict[str, nn.Parameter]]:
    """A zoo model, a plain copy of it, and what a revert must give back: state_dict keys, module classes and the
    Parameter objects."""
    model = build(name)
    return model, copy.deepcopy(model), list(model.state_dict()), module_types(model), dict(model.named_parameters())


def check_reverted(model: nn.Module, ref: nn.Module, keys: list[str], types, params: dict[str, nn.Parameter],
                   x: torch.Tensor) -> None:
    """``model`` (converted, stepped once without an optimizer, reverted) is ``ref`` again: same module classes,
    same Parameter objects and values, same state_dict keys, the same outputs in train and eval mode."""
    assert module_types(model) == types
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), n
    model.train()
    ref.train()
    torch.manual_seed(2)
    out = model(x)
    torch.manual_seed(2)
    assert torch.equal(out, ref(x))  # batch statistics: the running statistics play no part
    with torch.no_grad():  # the converted step updated the running statistics from its own forward
        for b, rb in zip(model.buffers(), ref.buffers(), strict=True):
            b.copy_(rb)
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


# ------------------------------------------------------------------------------------------- the zoo


@pytest.mark.parametrize("name", list(USER_MODELS))
def test_user_models_are_plain_small_modules(name):
    model = build(name)
    assert type(model).__name__ == name and name not in models.list_models()
    assert 2_000 <= sum(p.numel() for p in model.parameters()) <= 120_000
    x, y = example_batch(n=2)
    assert x.shape == (2, 3, 32, 32) and y.shape == (2,) and int(y.max()) < 10
    assert torch.equal(example_batch(n=2)[0], x) and not torch.equal(example_batch(n=2, seed=1)[0], x)


def test_user_models_carry_their_idioms():
    """The idiom each model is there for is really in it (a refactor must not tidy it away)."""
    relus = {n: [m for m in build(n).modules() if type(m) is nn.ReLU] for n in USER_MODELS}
    assert relus["FunctionalReLUNet"] == [] and relus["PreActStyle"] == []
    shared = build("SharedReLUNet")
    assert shared.layer2.relu.inplace and shared.layer2.downsample is not None
    assert relus["InplaceReLUNet"] and all(m.inplace for m in relus["InplaceReLUNet"])
    kinds = {n: {type(m) for m in build(n).modules()} for n in USER_MODELS}
    assert nn.ReLU6 in kinds["MobileNetStyle"] and nn.MaxPool2d in kinds["InplaceReLUNet"]
    assert nn.Dropout in kinds["InplaceReLUNet"] and nn.SiLU in kinds["EfficientNetStyle"]
    assert {nn.LayerNorm, nn.GELU, nn.Linear} <= kinds["ConvNeXtStyle"]
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in build("MobileNetStyle").modules())
    convnext_dw = [m for m in build("ConvNeXtStyle").modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert convnext_dw and all(m.kernel_size == (7, 7) for m in convnext_dw)


@pytest.mark.parametrize("name", ZOO)
def test_forward_backward_train_mode(name):
    model = build(name)
    x, y = example_batch()
    out = forward_backward(model, x, y)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------------ SWAT round trip


@pytest.mark.parametrize("name", ZOO)
def test_swat_convert_revert_round_trip(name):
    model, ref, keys, types, params = snapshot(name)
    x, y = example_batch()

    ctl = leanprop.convert_(model, leanprop.SWATConfig(sparsity=0.5))
    assert len(ctl.layers) > 0
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    out = forward_backward(model, x, y)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    leanprop.revert_(model)
    check_reverted(model, ref, keys, types, params, x)


# ------------------------------------------------------------------------- lossless BLPA = plain PyTorch


@pytest.mark.filterwarnings("ignore:BLPA. the model has no BatchNorm2d")  # most of the zoo: no unit found yet
@pytest.mark.parametrize("name", ZOO)
def test_blpa_32_bits_equals_plain_pytorch_and_reverts(name):
    model, ref, keys, types, params = snapshot(name)
    x, y = example_batch()

    ctl = leanprop.convert_(model, leanprop.BLPAConfig(bits=32, codec_bits=None))
    assert len(ctl.units) >= MIN_BLPA_UNITS.get(name, 0)
    assert list(model.state_dict()) == keys
    out = forward_backward(model, x, y)
    out_ref = forward_backward(ref, x, y)
    assert torch.equal(out, out_ref)  # forward bit for bit
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        # The fused units' BN backward sums in another order than PyTorch's: equal up to float32 rounding.
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
    for (n, b), rb in zip(model.named_buffers(), ref.buffers(), strict=True):
        assert torch.equal(b, rb), n  # running statistics updated exactly as nn.BatchNorm2d does

    leanprop.revert_(model)
    check_reverted(model, ref, keys, types, params, x)


# ------------------------------------------------------------------------- BLPA's codes: gradient cosines


@pytest.mark.filterwarnings("ignore:BLPA. the model has no BatchNorm2d")
@pytest.mark.parametrize(("bits", "bound"), [(8, 0.99), (4, 0.97)])
@pytest.mark.parametrize("name", ZOO)
def test_blpa_gradients_stay_close_to_plain_pytorch(name, bits, bound):
    """One step on a fixed batch of 8: the cosine between BLPA-K's parameter gradients and plain PyTorch's is at
    least 0.99 at 8 bits and 0.97 at 4 bits, on every model of the test zoo."""
    model = build(name)
    ref = copy.deepcopy(model)
    x, y = example_batch(8)
    leanprop.convert_(model, leanprop.BLPAConfig(bits=bits))
    forward_backward(model, x, y)
    forward_backward(ref, x, y)
    g = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()]).double()
    cos = float(F.cosine_similarity(g, g_ref, 0))
    assert cos >= bound, f"{name}: cosine {cos:.4f} at {bits} bits"
