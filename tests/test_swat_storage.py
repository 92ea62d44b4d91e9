"""Compressed storage of SWAT's saved tensors (issue 5): exact restore, same gradients, fewer bytes kept."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanprop
from leanprop import models
from leanprop.accounting.memory import saved_bytes
from leanprop.ops.saving_layers import MaskReLU
from leanprop.ops.sparse_storage import pack_above, pack_mask, pack_sparse, unpack_mask, unpack_sparse
from leanprop.swat.functions import swat_conv2d, swat_linear
from leanprop.swat.topk import keep_count, magnitude_mask, magnitude_threshold, sparsify


@pytest.mark.parametrize("density", [0.5, 0.1, 0.01, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pack_sparse_roundtrip_is_exact(density, dtype, channels_last):
    torch.manual_seed(0)
    t = torch.randn(3, 5, 7, 9).to(dtype)  # odd sizes: numel not a multiple of 8
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    keep = torch.rand(t.shape) < density
    positions, values, meta = pack_sparse(t, keep)
    back = unpack_sparse(positions, values, meta)
    assert back.dtype == dtype and back.shape == t.shape
    assert back.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(back, torch.where(keep, t, 0))
    assert values.numel() == int(keep.sum())
    # positions: the smaller of a 1-bit mask (numel/8 bytes) and int32 indices (4 bytes each)
    mask_bytes, index_bytes = (t.numel() + 7) // 8, 4 * int(keep.sum())
    assert meta.indexed == (index_bytes < mask_bytes)
    assert positions.numel() * positions.element_size() == min(mask_bytes, index_bytes)


def test_pack_mask_roundtrip_and_shape_check():
    keep = torch.rand(4, 3, 5, 5) < 0.3
    bits, meta = pack_mask(keep)
    assert bits.dtype == torch.uint8 and bits.numel() == (keep.numel() + 7) // 8
    assert torch.equal(unpack_mask(bits, meta), keep)
    with pytest.raises(ValueError, match="shape"):
        pack_sparse(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.bool))


def _sparse(t, s):
    thr = magnitude_threshold(t.detach(), keep_count(t.numel(), s))
    return sparsify(t.detach(), thr), thr


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("amp", [False, True])
def test_compressed_conv_and_linear_give_the_same_gradients(channels_last, amp):
    torch.manual_seed(0)
    grads = []
    x0 = torch.relu(torch.randn(4, 8, 9, 9))
    w0, b0 = torch.randn(6, 8, 3, 3), torch.randn(6)
    xl0, wl0 = torch.randn(2, 5, 12), torch.randn(7, 12)
    for compress in (False, True):
        x, w, b = (t.clone().requires_grad_(True) for t in (x0, w0, b0))
        xl, wl = xl0.clone().requires_grad_(True), wl0.clone().requires_grad_(True)
        if channels_last:
            x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        w_s, _ = _sparse(w, 0.8)
        _, thr = _sparse(x, 0.9)
        wl_s, _ = _sparse(wl, 0.7)
        _, thr_l = _sparse(xl, 0.6)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = swat_conv2d(x, w, w_s, b, thr, padding=1, compress=compress)
            yl = swat_linear(xl, wl, wl_s, None, thr_l, compress=compress)
        (y.float().square().sum() + yl.float().sin().sum()).backward()
        grads.append([x.grad, w.grad, b.grad, xl.grad, wl.grad])
    for a, c in zip(*grads, strict=True):
        assert torch.equal(a, c)
    assert (grads[1][1] != 0).float().mean() > 0.9  # pruned weights still learn


def test_compressed_conv_without_dropping_keeps_x_dense():
    """A threshold of 0 (sparsity 0) keeps every entry: X is saved as it is, nothing is packed."""
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    ref = torch.nn.functional.conv2d(x, w)
    ref.sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    swat_conv2d(x, w, w.detach(), None, 0.0, compress=True).sum().backward()
    assert torch.allclose(x.grad, gx) and torch.allclose(w.grad, gw)


def _step(model, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_convert_compressed_model_matches_uncompressed_and_reverts():
    torch.manual_seed(0)
    plain = models.create("resnet8")
    a, b = copy.deepcopy(plain), copy.deepcopy(plain)
    leanprop.convert_(a, leanprop.SWATConfig(sparsity=0.9))
    leanprop.convert_(b, leanprop.SWATConfig(sparsity=0.9, compress_saved=True))
    assert sum(isinstance(m, MaskReLU) for m in b.modules()) == 7
    assert not any(isinstance(m, MaskReLU) for m in a.modules())
    assert list(b.state_dict()) == list(plain.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    ga, gb = _step(a, x, y), _step(b, x, y)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=0, atol=1e-6), n
    leanprop.revert_(b)
    assert not any(isinstance(m, MaskReLU) for m in b.modules())
    assert all(type(m) is not leanprop.swat.layers.SWATConv2d for m in b.modules())


def test_compressed_swat_keeps_fewer_bytes_for_backward():
    """The audit: uncompressed SWAT keeps what dense keeps plus 1-bit weight masks (X_s is X, shared with the
    ReLU's saved output; W_s is the Parameter + mask); compressed SWAT keeps X_s at ~(1/32 + 0.1) of fp32 and
    1-bit ReLU masks, with the BN inputs still dense."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    totals = {}
    for label, cfg in (("dense", None), ("swat", leanprop.SWATConfig(sparsity=0.9)),
                       ("compressed", leanprop.SWATConfig(sparsity=0.9, compress_saved=True))):
        m = models.create("resnet8")
        if cfg is not None:
            leanprop.convert_(m, cfg)
        totals[label] = saved_bytes(m.train(), x).total_bytes
    assert totals["dense"] < totals["swat"] < 1.02 * totals["dense"]
    assert totals["compressed"] < 0.7 * totals["dense"]


def _pool_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_compressed_swat_max_pool_keeps_window_positions_with_the_same_gradients():
    from leanprop.ops.saving_layers import IndexMaxPool2d

    torch.manual_seed(0)
    plain = _pool_net()
    a, b = copy.deepcopy(plain), copy.deepcopy(plain)
    cfg = dict(sparsity=0.5, sparsify_first_layer=True)
    leanprop.convert_(a, leanprop.SWATConfig(**cfg))
    leanprop.convert_(b, leanprop.SWATConfig(**cfg, compress_saved=True))
    assert isinstance(b[3], IndexMaxPool2d) and type(a[3]) is nn.MaxPool2d
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    ga, gb = _step(a, x, y), _step(b, x, y)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=0, atol=1e-6), n
    kept = saved_bytes(b.train(), x)
    assert kept.by_origin["IndexMaxPool2d"] == 4 * 8 * 8 * 8           # one uint8 per pooled output
    leanprop.revert_(b)
    assert type(b[3]) is nn.MaxPool2d and list(b.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("k, s, p, d, ceil, shape, channels_last", [
    (3, 2, 1, 1, False, (2, 3, 9, 9), False), (2, 2, 0, 1, False, (2, 3, 8, 8), False),
    (3, 2, 1, 2, True, (2, 3, 10, 11), False), (3, 1, 1, 1, False, (2, 4, 7, 7), True),
    (3, 2, 0, 1, True, (3, 8, 8), False),
    ((3, 2), (1, 2), (1, 0), (2, 1), False, (2, 3, 9, 6), False),  # rectangular window, row dilation
    ((2, 3), 1, (0, 1), (1, 2), False, (2, 3, 6, 7), False),  # column dilation
    (3, 1, 1, 1, False, (2, 3, 5, 2), False)])  # a window as wide as the input: the division path
def test_max_pool_window_index_equals_max_pool2d(k, s, p, d, ceil, shape, channels_last):
    from leanprop.ops.saving_layers import max_pool2d_window_index

    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64)
    x[..., 0, :2] = 5.0                                                 # ties: the first maximum, as PyTorch
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = F.max_pool2d(a, k, s, p, d, ceil), max_pool2d_window_index(b, k, s, p, d, ceil)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-12)
    if channels_last:
        assert b.grad.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="256"):
        max_pool2d_window_index(x, 17)


def test_magnitude_mask_matches_sparsify_support():
    t = torch.randn(1000)
    thr = magnitude_threshold(t, 100)
    assert torch.equal(magnitude_mask(t, thr), sparsify(t, thr) != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel", [1, 13, 8 * 1000, (1 << 16) * 3 + 5])  # tails: within a byte, a chunk, chunks
@pytest.mark.parametrize("density", [0.5, 0.1, 0.01])
def test_compiled_pack_equals_the_torch_pack(dtype, numel, density):
    from leanprop.ops.sparse_storage import _kernels

    if _kernels() is None:
        pytest.skip("no C compiler: the compiled packer is not built")
    torch.manual_seed(numel)
    t = torch.randn(numel).to(dtype)
    t[0] = float("nan")  # dropped by both, like magnitude_mask
    thr = float(t.abs().float().nan_to_num(0).quantile(1 - density)) if numel > 1 else 0.5
    pos_c, val_c, meta_c = pack_above(t, thr)
    pos_t, val_t, meta_t = pack_above(t, thr, use_kernels=False)
    assert meta_c.indexed == meta_t.indexed
    assert torch.equal(pos_c, pos_t) and torch.equal(val_c, val_t)  # same layout: either side can unpack
    ref = torch.where(t.abs().float() >= thr, t, 0)
    assert torch.equal(unpack_sparse(pos_c, val_c, meta_c), ref)
    assert torch.equal(unpack_sparse(pos_t, val_t, meta_t), ref)


def test_measured_activation_density_counts_the_nonzeros_of_x_s():
    """A threshold of 0 (more natural zeros than the target drops) keeps only the non-zeros, and so says the
    measurement (it used to count every entry as kept)."""
    from leanprop.swat.layers import _kept_density

    x = torch.zeros(1000)
    x[:150] = torch.rand(150) + 0.1  # 85 % zeros
    assert _kept_density(x, torch.tensor(0.0)) == pytest.approx(0.15)
    assert _kept_density(x, torch.tensor(0.6)) == pytest.approx(float((x >= 0.6).sum()) / 1000)
    assert _kept_density(x, None) == pytest.approx(0.15)
