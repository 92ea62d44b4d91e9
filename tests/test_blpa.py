"""BLPA: quantiser (ref bit-exact vs a NumPy port), packing, fused unit gradients, convert_, memory audit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import leanprop
from leanprop.blpa import quantizer as qz
from leanprop.blpa.config import BLPAConfig
from leanprop.blpa.functions import UnitSpec, bn_relu, bn_relu_conv
from leanprop.models import create
from leanprop.ops.codec import SavedTensorCodec, find_codec
from leanprop.ops.kernels import load_kernels
from leanprop.ops.packing import flat_memory_view, pack_bits, unpack_bits


def _kernels():
    try:
        return load_kernels(required=True)
    except RuntimeError:
        return None


KERNELS = _kernels()
needs_c = pytest.mark.skipif(KERNELS is None, reason="no working C compiler: compiled BLPA kernels unavailable")


def _spec(bits=4, kernels="torch", **kw):
    cfg = BLPAConfig(bits=bits, kernels=kernels, **kw)
    return UnitSpec(cfg=cfg, kernels=KERNELS if kernels == "c" else None, eps=1e-5, momentum=0.1,
                    stride=(1, 1), padding=(1, 1))


def _bn_stats(x):
    y, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    return mean, invstd


# ---------------------------------------------------------------- quantiser ----------------------------------
def _numpy_ref(x, mean, invstd, gamma, beta, bits):
    """NumPy port of the reference tf_quant (spec §1.4), float32 throughout."""
    f = np.float32
    n = 2 ** bits
    delta = f(6.0) / f(n)
    gbar = np.maximum(f(1e-8), gamma.astype(f))
    b = (beta.astype(f) / gbar).reshape(1, -1, 1, 1)
    s = np.maximum(f(1), f(n / 2) - np.floor(b / delta)).astype(f)
    xhat = (x.astype(f) - mean.reshape(1, -1, 1, 1)) * invstd.reshape(1, -1, 1, 1)
    a = xhat + b
    q = np.clip(np.floor((a - f(1e-6)) / delta) + s, 0, n - 1)
    restored = (q + f(0.5) - s) * delta
    return q.astype(np.uint8), q >= s, restored - b, np.maximum(f(0), gbar.reshape(1, -1, 1, 1) * restored)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_ref_mode_matches_numpy_port_bit_for_bit(bits):
    """Codes and ReLU masks bit for bit; restored values up to float rounding."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(8, 6, 5, 5, generator=g) * 1.7 + 0.3
    gamma = torch.tensor([1.0, 0.5, 2.0, 0.3, -0.7, 1.2])
    beta = torch.tensor([0.0, -0.3, 0.7, 2.5, 0.1, 3.5])
    mean, invstd = _bn_stats(x)
    cfg = BLPAConfig(bits=bits, mode="ref")
    coef = qz.channel_coefficients(mean, invstd, gamma, beta, cfg)
    y = torch.batch_norm(x, gamma, beta, None, None, True, 0.1, 1e-5, False)
    q = qz.encode(x, y, mean, invstd, coef, cfg)
    q_np, m_np, xhat_np, z_np = _numpy_ref(x.numpy(), mean.numpy(), invstd.numpy(), gamma.numpy(), beta.numpy(), bits)
    assert np.array_equal(q.numpy(), q_np)
    assert np.array_equal(qz.decode_mask(q, coef).numpy(), m_np)
    # the restore is evaluated as the affine q*A + B: equal up to float rounding
    assert np.allclose(qz.decode_xhat(q, coef).numpy(), xhat_np, rtol=1e-6, atol=1e-6)
    assert np.allclose(qz.decode_z(q, coef, torch.float32).numpy(), z_np, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_signaware_mask_is_exact_for_any_gamma(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, 6, 6, generator=g)
    gamma = torch.tensor([1.0, -1.0, 0.0, 0.0, 3.0, -0.01, 1e-3, -5.0])
    beta = torch.tensor([0.2, 0.2, 0.5, -0.5, -4.0, 0.0, 1.0, 20.0])
    mean, invstd = _bn_stats(x)
    cfg = BLPAConfig(bits=bits)
    coef = qz.channel_coefficients(mean, invstd, gamma, beta, cfg)
    y = torch.batch_norm(x, gamma, beta, None, None, True, 0.1, 1e-5, False)
    q = qz.encode(x, y, mean, invstd, coef, cfg)
    assert torch.equal(qz.decode_mask(q, coef), y > 0)
    # inside the window the restored xhat is within half a step (channels with gamma != 0 and a centred window)
    xhat = (x - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    err = (qz.decode_xhat(q, coef) - xhat)[:, [0, 1]]
    inside = xhat[:, [0, 1]].abs() < 2.5
    assert err[inside].abs().max() <= cfg.step / 2 + 1e-5


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 7, 8, 13, 1001])
def test_pack_roundtrip_odd_sizes(bits, n):
    codes = torch.randint(0, 2 ** bits, (n,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == -(-n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)
    if KERNELS is not None:
        assert torch.equal(KERNELS.pack(codes, bits), packed)
        assert torch.equal(KERNELS.unpack(packed, bits, n), codes)


# ---------------------------------------------------------------- fused unit ---------------------------------
def _plain_unit(x, bn, conv, g):
    x = x.clone().requires_grad_()
    out = conv(torch.relu(bn(x)))
    out.backward(g)
    return out.detach(), [x.grad, bn.weight.grad, bn.bias.grad, conv.weight.grad]


def _fused_unit(x, bn, conv, g, spec, channels_last=False):
    x = x.clone().requires_grad_()
    bn.zero_grad()
    conv.zero_grad()
    out = bn_relu_conv(x, bn.weight, bn.bias, conv.weight, conv.bias, None, None, spec)
    out.backward(g)
    return out.detach(), [x.grad, bn.weight.grad, bn.bias.grad, conv.weight.grad]


def _unit_modules(c_in=6, c_out=5, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(c_in).to(dtype)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=True).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn, conv


def test_lossless_unit_equals_pytorch_float64():
    bn, conv = _unit_modules(dtype=torch.float64)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 2 + 0.3
    g = torch.randn(4, 5, 5, 5, dtype=torch.float64)
    out1, g1 = _plain_unit(x, bn, conv, g)
    out2, g2 = _fused_unit(x, bn, conv, g, _spec(bits=32))
    assert torch.equal(out1, out2)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_lossless_unit():
    bn, conv = _unit_modules(c_in=3, c_out=2, dtype=torch.float64)
    spec = _spec(bits=32)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64, requires_grad=True)

    def f(x, gamma, beta, w):
        return bn_relu_conv(x, gamma, beta, w, None, None, None, spec)

    gamma = bn.weight.detach().clone().requires_grad_()
    beta = bn.bias.detach().clone().requires_grad_()
    w = conv.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, gamma, beta, w), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantised_gradients_within_analytic_bound(bits):
    """g_z, the mask and dbeta are exact; the rest errs through xhat~ by at most Delta/2 per element."""
    bn, conv = _unit_modules(c_in=8, c_out=8)
    x = torch.randn(32, 8, 8, 8) * 1.5 + 0.2
    g = torch.randn(32, 8, 8, 8)
    _, (gx1, dgam1, dbeta1, dw1) = _plain_unit(x, bn, conv, g)
    _, (gx2, dgam2, dbeta2, dw2) = _fused_unit(x, bn, conv, g, _spec(bits=bits))
    torch.testing.assert_close(dbeta2, dbeta1, rtol=1e-4, atol=1e-4)  # exact up to summation order
    delta = BLPAConfig(bits=bits).step
    # dgamma = sum g_y * xhat: |error| <= sum |g_y| * (Delta/2) (+ saturation outside the +-3 sigma window)
    y = bn(x)
    gz = torch.nn.grad.conv2d_input(x.shape, conv.weight, g, padding=1)
    gy = gz * (y > 0)
    bound = gy.abs().sum((0, 2, 3)) * delta / 2
    assert torch.all((dgam2 - dgam1).abs() <= bound * 1.05 + 1e-4)
    # z~ errs by at most |gamma|*Delta/2 inside the window, and dW is exactly the conv weight-gradient of z~
    cfg = BLPAConfig(bits=bits)
    mean, invstd = _bn_stats(x)
    coef = qz.channel_coefficients(mean, invstd, bn.weight, bn.bias, cfg)
    q = qz.encode(x, y, mean, invstd, coef, cfg)
    z_t = qz.decode_z(q, coef, torch.float32)
    inside = (q > 0) & (q < cfg.levels - 1)  # not saturated (the window follows the zero of y, spec §1.4)
    zerr = (z_t - torch.relu(y)).abs() / bn.weight.detach().abs().view(1, -1, 1, 1)
    assert zerr[inside].max() <= delta / 2 + 1e-5
    torch.testing.assert_close(dw2, torch.nn.grad.conv2d_weight(z_t, conv.weight.shape, g, padding=1),
                               rtol=1e-4, atol=1e-3)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    limit = {8: 0.05, 4: 0.2, 2: 0.6}[bits]
    assert rel(dw2, dw1) < limit and rel(gx2, gx1) < limit


@needs_c
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_match_torch_path(bits, channels_last, dtype):
    bn, conv = _unit_modules(c_in=8, c_out=6)
    with torch.no_grad():
        bn.weight[0] = 0.0  # a gamma = 0 channel
    x = (torch.randn(4, 8, 6, 6) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 6, 6, 6).to(dtype)
    res = []
    for kernels in ("torch", "c"):
        x2 = x.clone().requires_grad_()
        bn.zero_grad()
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = bn_relu_conv(x2, bn.weight, bn.bias, conv.weight, conv.bias, None, None, _spec(bits, kernels))
        out.backward(g.to(out.dtype))
        res.append([out, x2.grad, bn.weight.grad.clone(), bn.bias.grad.clone(), conv.weight.grad.clone()])
    (o1, gx1, dg1, db1, dw1), (o2, gx2, dg2, db2, dw2) = res
    assert torch.equal(o1, o2) and torch.equal(dw1, dw2)  # same codes -> same z~ -> same dW
    for a, b in ((gx1, gx2), (dg1, dg2), (db1, db2)):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-3 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_fused_unit_keeps_nothing_of_activation_size_in_fp32():
    """Audit: only the packed codes, O(C) tables and the weights are saved (spec §5.4)."""
    bn, conv = _unit_modules(c_in=16, c_out=16)
    x = torch.randn(8, 16, 16, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = bn_relu_conv(x, bn.weight, bn.bias, conv.weight, None, None, None, _spec(bits=4))
    act = x.numel()
    for t in saved:
        if t.is_floating_point():
            assert t.numel() < act / 8, f"a float tensor of shape {tuple(t.shape)} was kept"
        else:
            assert t.dtype == torch.uint8 and t.numel() == act // 2
    assert sum(t.dtype == torch.uint8 for t in saved) == 1
    out.sum().backward()


def test_half_unit_and_simulate_give_packed_gradients():
    bn, _ = _unit_modules(c_in=6)
    x = torch.randn(8, 6, 5, 5)
    grads = []
    for simulate in (False, True):
        xx = x.clone().requires_grad_()
        z = bn_relu(xx, bn.weight, bn.bias, None, None, _spec(bits=4, simulate=simulate))
        torch.testing.assert_close(z, torch.relu(bn(x)))
        (z * torch.arange(z.numel()).view_as(z).float().sin()).sum().backward()
        grads.append(xx.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- convert_ -----------------------------------
@pytest.mark.parametrize("shortcut", ["pad", "projection"])
def test_convert_preact_lossless_equals_plain(shortcut):
    torch.manual_seed(0)
    plain = create("preact_resnet20", shortcut=shortcut)
    model = copy.deepcopy(plain)
    keys = list(plain.state_dict())
    ctl = leanprop.convert_(model, BLPAConfig(bits=32, codec_bits=None, kernels="torch"))
    assert list(model.state_dict()) == keys
    assert len(ctl.units) == 19 and "fused" in ctl.summary()
    x = torch.randn(4, 3, 32, 32)
    out1, out2 = plain(x), model(x)
    assert torch.equal(out1, out2)
    out1.square().sum().backward()
    out2.square().sum().backward()
    for (name, p1), p2 in zip(plain.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-6, msg=name)
    for b1, b2 in zip(plain.buffers(), model.buffers(), strict=True):
        assert torch.equal(b1, b2)  # running statistics updated exactly as nn.BatchNorm2d does
    model.eval()
    plain.eval()
    assert torch.equal(plain(x), model(x))
    leanprop.revert_(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]
    assert find_codec(model) is None


def test_convert_reuses_parameters_and_loads_into_plain_model():
    torch.manual_seed(0)
    model = create("preact_resnet20", shortcut="pad")
    params = {n: p for n, p in model.named_parameters()}
    leanprop.convert_(model, BLPAConfig(bits=4))
    assert all(p is params[n] for n, p in model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    fresh = create("preact_resnet20", shortcut="pad")
    fresh.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match=r"already converted \(blpa\)"):
        leanprop.convert_(model, BLPAConfig(bits=4))


def test_convert_generic_sequential_and_warns_when_nothing_fuses():
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    ctl = leanprop.convert_(seq, BLPAConfig(bits=8))
    assert [(u.bn, u.conv) for u in ctl.units] == [("1", "3"), ("4", None)]
    seq(torch.randn(2, 3, 8, 8)).sum().backward()
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.warns(RuntimeWarning, match="no BatchNorm2d->ReLU"):
        leanprop.convert_(mlp, BLPAConfig(bits=4))


@pytest.mark.parametrize(("kernel", "padding", "mode", "fused"), [
    (3, "same", "zeros", True), (3, "valid", "zeros", True), (5, "same", "zeros", True), (2, "same", "zeros", False),
    (3, 1, "reflect", False), (3, 1, "circular", False), (3, "same", "replicate", False)])
def test_unit_conv_padding_string_or_mode(kernel, padding, mode, fused):
    """``padding="same"/"valid"`` convs join a fused unit with the zero padding they stand for; a conv the unit cannot
    run (another padding mode, uneven "same" padding) is left out of it -- the run is a half unit, never an error --
    and 32-bit codes still give plain PyTorch's forward bit for bit and its gradients."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, kernel, padding=padding, padding_mode=mode), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    ref = copy.deepcopy(seq)
    ctl = leanprop.convert_(seq, BLPAConfig(bits=32, codec_bits=None))
    assert [(u.bn, u.conv) for u in ctl.units] == [("1", "3" if fused else None), ("4", None)]
    x = torch.randn(4, 3, 9, 9)
    out, out_ref = seq(x), ref(x)
    assert torch.equal(out, out_ref)
    out.sum().backward()
    out_ref.sum().backward()
    for (n, p), q in zip(seq.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_codec_dedups_and_compresses_outside_units():
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    codec = SavedTensorCodec(bits=8, min_bytes=0)
    codec.attach(model)
    kept = []

    class Ledger:
        def record(self, t, kind=None):
            kept.append(t)

    x = torch.randn(8, 3, 16, 16)
    with codec.recording(Ledger()):
        out = model(x)
    act = sum(t.numel() * t.element_size() for t in kept if t.dtype == torch.uint8)
    # ReLU output saved by ReLU and by conv2 is compressed once: input + relu output at 1 byte/element
    assert act == x.numel() + 8 * 32 * 16 * 16
    out.sum().backward()
    codec.detach()
    assert find_codec(model) is None


def test_codec_codes_large_1d_float_tensors_and_keeps_small_ones():
    """SWAT's packed X_s values are 1-D: under SWAT+BLPA they must become codes too (issue 5)."""
    codec = SavedTensorCodec(bits=8, min_bytes=1024)
    values = torch.rand(4096) + 0.5
    packed = codec.pack(values)
    assert not isinstance(packed, torch.Tensor)
    back = codec.unpack(packed)
    assert back.shape == values.shape and (back - values).abs().max() <= 1.0 / 255 + 1e-6
    small = torch.rand(100)
    assert codec.pack(small) is small


def test_blpa_memory_ratio_preact_resnet20():
    from leanprop.accounting.memory import saved_bytes

    torch.manual_seed(0)
    dense = saved_bytes(create("preact_resnet20", shortcut="pad"), torch.randn(16, 3, 32, 32)).total_bytes
    model = create("preact_resnet20", shortcut="pad")
    leanprop.convert_(model, BLPAConfig(bits=4))
    blpa4 = saved_bytes(model, torch.randn(16, 3, 32, 32)).total_bytes
    assert dense / blpa4 > 12, (dense, blpa4)


def test_config_validation():
    with pytest.raises(ValueError, match="bits"):
        BLPAConfig(bits=3)
    with pytest.raises(ValueError, match="mode"):
        BLPAConfig(mode="fast")
    with pytest.raises(ValueError, match="window"):
        BLPAConfig(mode="ref", window=2.5)
    assert BLPAConfig(bits=4).step == 6 / 16


def test_flat_memory_view_channels_last():
    x = torch.arange(24.0).view(1, 2, 3, 4).contiguous(memory_format=torch.channels_last)
    assert torch.equal(flat_memory_view(x), x.permute(0, 2, 3, 1).reshape(-1))


@pytest.mark.parametrize("kernels", [None, "c"])
def test_mask_relu_keeps_one_bit_and_exact_gradient(kernels):
    from leanprop.ops.saving_layers import mask_relu

    if kernels == "c" and KERNELS is None:
        pytest.skip("no working C compiler")
    x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = mask_relu(x, KERNELS if kernels else None)
    assert torch.equal(out, torch.relu(x))
    assert len(saved) == 1 and saved[0].dtype == torch.uint8 and saved[0].numel() == -(-x.numel() // 8)
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(x.grad, g * (x > 0))


def test_outside_relus_keep_masks_through_the_codec_and_revert():
    """ReLU-family modules stay ReLUs that the storage policy sees (as it sees F.relu), kept eager under
    torch.compile; max-pooling modules keep window indices; revert_ gives the PyTorch classes back."""
    from leanprop.ops.codec import find_codec
    from leanprop.ops.saving_layers import EagerLeakyReLU, EagerReLU, EagerReLU6, IndexMaxPool2d

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6(),
                          nn.MaxPool2d(2), nn.Conv2d(8, 8, 1), nn.LeakyReLU(0.1))
    with pytest.warns(RuntimeWarning, match="storage policy still keeps masks"):
        leanprop.convert_(model, BLPAConfig(bits=4))
    assert [type(model[i]) for i in (1, 3, 4, 6)] == [EagerReLU, EagerReLU6, IndexMaxPool2d, EagerLeakyReLU]
    assert model[6].negative_slope == 0.1
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert find_codec(model).stats["masks"] == 3
    leanprop.revert_(model)
    assert [type(model[i]) for i in (1, 3, 4, 6)] == [nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.LeakyReLU]


def test_convert_imagenet_preact_resnet152():
    torch.manual_seed(0)
    model = create("preact_resnet152", num_classes=10, shortcut="pad")
    keys = list(model.state_dict())
    ctl = leanprop.convert_(model, BLPAConfig(bits=4))
    assert list(model.state_dict()) == keys
    assert sum(u.conv is not None for u in ctl.units) == 3 * (3 + 8 + 36 + 3) - 1  # layer1[0] has no pre-act
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 16, 8, 8), (13,)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_mask_relu_compiled_equals_torch_and_keeps_the_input_layout(dtype, shape, channels_last):
    from leanprop.ops.kernels import load_kernels
    from leanprop.ops.saving_layers import mask_relu

    k = load_kernels(required=False)
    if k is None:
        pytest.skip("no C compiler")
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs 4-D")
    torch.manual_seed(0)
    x0 = torch.randn(shape).to(dtype)
    x0.view(-1)[:3] = torch.tensor([float("nan"), 0.0, -0.0])  # relu keeps NaN; none of the three passes g
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape).to(dtype)  # NCHW gradient even for a channels-last input
    outs = []
    for kernels in (None, k):
        x = x0.clone().requires_grad_(True)
        y = mask_relu(x, kernels)
        y.backward(g)
        outs.append((y, x.grad))
    ref = torch.relu(x0)
    for y, gx in outs:
        assert torch.allclose(y, ref, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(gx, torch.where(x0 > 0, g, 0))
        assert gx.is_contiguous(memory_format=torch.channels_last) == channels_last  # BN backward's fast layout


def test_c_kernels_refuse_tensors_off_the_cpu():
    """The C kernels read raw host pointers: a tensor on another device is an error, never handed to C."""
    from leanprop.ops.kernels import load_kernels

    k = load_kernels(required=False)
    if k is None:
        pytest.skip("no C compiler: the compiled kernels are not built here")
    meta = torch.empty(64, device="meta")
    with pytest.raises(ValueError, match="CPU tensors only"):
        k.relu_mask(meta)
    with pytest.raises(ValueError, match="CPU tensors only"):
        k.sparse_pack(meta, 0.5)
    with pytest.raises(ValueError, match="CPU tensors only"):
        k.pack(torch.empty(64, dtype=torch.uint8, device="meta"), 4)
