"""SWAT conv/linear autograd Functions: spec swat.md §7 checks 1-2, gradcheck, AMP."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from leanprop.swat.functions import swat_conv2d, swat_linear
from leanprop.swat.topk import keep_count, magnitude_threshold, sparsify


def topk_sparse(t: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    thr = magnitude_threshold(t, keep_count(t.numel(), s))
    return sparsify(t.detach(), thr), thr


def _grads(*ts):
    return [None if t is None else (None if t.grad is None else t.grad.clone()) for t in ts]


CONV_CONFIGS = [
    dict(cin=8, cout=8, k=3),
    dict(cin=8, cout=16, k=3, stride=2),
    dict(cin=8, cout=8, k=3, padding=1),
    dict(cin=8, cout=8, k=3, padding=2, dilation=2),
    dict(cin=8, cout=12, k=3, padding=1, groups=2),
    dict(cin=8, cout=8, k=3, padding=1, groups=8),  # depthwise
    dict(cin=8, cout=8, k=1, bias=False),
    dict(cin=8, cout=8, k=3, padding=1, channels_last=True),
    dict(cin=8, cout=8, k=3, padding=(1, 0), stride=(1, 2)),
    dict(cin=8, cout=8, k=3, padding="same"),
    dict(cin=8, cout=8, k=4, padding="same"),  # even kernel: asymmetric, x padded first
    dict(cin=8, cout=8, k=3, padding="valid"),
    dict(cin=8, cout=8, k=3, padding=1, batch=1),
]


def _conv(cfg):
    return nn.Conv2d(cfg["cin"], cfg["cout"], cfg["k"], stride=cfg.get("stride", 1), padding=cfg.get("padding", 0),
                     dilation=cfg.get("dilation", 1), groups=cfg.get("groups", 1), bias=cfg.get("bias", True))


def _conv_args(conv):
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_conv_at_sparsity_zero_equals_nn_conv2d(cfg):
    """§7 check 1: weight_sparse = weight and no activation threshold reproduce nn.Conv2d bit for bit."""
    torch.manual_seed(0)
    conv = _conv(cfg)
    x = torch.randn(cfg.get("batch", 3), cfg["cin"], 11, 10)
    if cfg.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
        conv = conv.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y_ref = conv(x)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    ref = _grads(x, conv.weight, conv.bias)
    x.grad = None
    conv.zero_grad()
    y = swat_conv2d(x, conv.weight, conv.weight, conv.bias, None, **_conv_args(conv))
    y.backward(g)
    assert torch.equal(y, y_ref)
    for a, b in zip(ref, _grads(x, conv.weight, conv.bias), strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    if cfg.get("channels_last"):
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(5, 16), (3, 5, 16), (2, 3, 4, 16), (16,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_at_sparsity_zero_equals_nn_linear(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    y_ref = lin(x)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    ref = _grads(x, lin.weight, lin.bias)
    x.grad = None
    lin.zero_grad()
    y = swat_linear(x, lin.weight, lin.weight, lin.bias)
    y.backward(g)
    assert torch.equal(y, y_ref)
    for a, b in zip(ref, _grads(x, lin.weight, lin.bias), strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg", [
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=2, padding=1, dilation=1, groups=1),
    dict(stride=1, padding=2, dilation=2, groups=2),
    dict(stride=1, padding=1, dilation=1, groups=16),
], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_sparse_gradients_match_the_definition(cfg, channels_last):
    """§7 check 2 at s = 0.9: Y = conv(X, TopK(W)), dX = conv2d_input(TopK(W), G), dW = conv2d_weight(TopK(X), G),
    db = ΣG; pruned weights get non-zero dW; G is not modified."""
    torch.manual_seed(1)
    groups = cfg["groups"]
    x = torch.randn(4, 16, 12, 12)
    w = torch.randn(16, 16 // groups, 3, 3, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w_s, _ = topk_sparse(w, 0.9)
    x_s, x_thr = topk_sparse(x, 0.9)
    assert int((w_s != 0).sum()) == keep_count(w.numel(), 0.9)
    assert int((x_s != 0).sum()) == keep_count(x.numel(), 0.9)
    x.requires_grad_(True)
    y = swat_conv2d(x, w, w_s, b, x_thr, **cfg)
    g = torch.randn_like(y)
    g_copy = g.clone()
    y.backward(g)
    assert torch.equal(g, g_copy)
    y_expected = F.conv2d(x.detach(), w_s, b.detach(), **cfg)
    assert torch.equal(y, y_expected)
    dx = torch.nn.grad.conv2d_input(x.shape, w_s, g, **cfg)
    dw = torch.nn.grad.conv2d_weight(x_s, w.shape, g, **cfg)
    torch.testing.assert_close(x.grad, dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, dw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, g.sum((0, 2, 3)))
    pruned = w_s == 0
    assert (w.grad[pruned] != 0).float().mean() > 0.5  # dense dW: pruned weights keep learning
    # and dW really used the sparse X: it differs from the dense-X gradient
    assert not torch.allclose(w.grad, torch.nn.grad.conv2d_weight(x.detach(), w.shape, g, **cfg), atol=1e-3)


def test_linear_sparse_gradients_match_the_definition():
    torch.manual_seed(2)
    x = torch.randn(6, 5, 32)
    w = torch.randn(24, 32, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    w_s, _ = topk_sparse(w, 0.9)
    x_s, x_thr = topk_sparse(x, 0.9)
    x.requires_grad_(True)
    y = swat_linear(x, w, w_s, b, x_thr)
    g = torch.randn_like(y)
    g_copy = g.clone()
    y.backward(g)
    assert torch.equal(g, g_copy)
    assert torch.equal(y, F.linear(x.detach(), w_s, b.detach()))
    g2 = g.reshape(-1, 24)
    torch.testing.assert_close(x.grad, (g2 @ w_s).reshape(x.shape))
    torch.testing.assert_close(w.grad, (x_s.reshape(-1, 32).t() @ g2).t())  # (X_sᵀ·G)ᵀ
    torch.testing.assert_close(b.grad, g2.sum(0))
    assert (w.grad[w_s == 0] != 0).float().mean() > 0.5


def test_no_gradient_flows_to_weight_sparse_or_threshold():
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    w_s = w.detach().clone().requires_grad_(True)
    thr = torch.tensor(0.5, requires_grad=True)
    swat_conv2d(x, w, w_s, None, thr, padding=1).sum().backward()
    assert w_s.grad is None and thr.grad is None
    assert w.grad is not None and x.grad is not None


def test_frozen_weight_and_input_without_grad():
    """Only the needed gradients are computed; X_s is not even built when the weight is frozen."""
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = torch.randn(4, 4, 3, 3)
    b = torch.randn(4, requires_grad=True)
    y = swat_conv2d(x, w, w, b, 0.3, padding=1)
    assert y.grad_fn.saved_tensors[0] is None  # X_s not built: the weight needs no gradient
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.nn.grad.conv2d_input(x.shape, w, torch.ones_like(y), padding=1))
    torch.testing.assert_close(b.grad, torch.full((4,), float(y[:, 0].numel())))
    x2 = torch.randn(2, 4, 6, 6)
    w2 = torch.randn(4, 4, 3, 3, requires_grad=True)
    swat_conv2d(x2, w2, w2.detach(), None, None, padding=1).sum().backward()
    assert w2.grad is not None
    lin_w = torch.randn(3, 5)
    xl = torch.randn(4, 5, requires_grad=True)
    swat_linear(xl, lin_w, lin_w, None, 0.2).sum().backward()
    torch.testing.assert_close(xl.grad, torch.ones(4, 3) @ lin_w)


def test_threshold_as_tensor_float_or_none_and_saved_x_identity():
    torch.manual_seed(3)
    x = torch.randn(1, 4, 7, 7, requires_grad=True)  # batch size 1
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    results = []
    for thr in (torch.tensor(0.8), 0.8):
        w.grad = None
        swat_conv2d(x, w, w.detach(), None, thr, padding=1).sum().backward()
        results.append(w.grad.clone())
    assert torch.equal(results[0], results[1])
    w.grad = None
    swat_conv2d(x, w, w.detach(), None, None, padding=1).sum().backward()
    assert not torch.equal(w.grad, results[0])
    w.grad = None
    swat_conv2d(x, w, w.detach(), None, torch.tensor(0.0), padding=1).sum().backward()
    dense = w.grad.clone()
    torch.testing.assert_close(dense, torch.nn.grad.conv2d_weight(x.detach(), w.shape, torch.ones(1, 6, 7, 7),
                                                                  padding=1))


def test_uncompressed_x_s_shares_the_input_storage_and_copies_the_threshold():
    """X_s = TopK(X) is applied in the backward: no zero-filled copy of X is kept, and changing the layer's
    threshold buffer after the forward does not change the weight gradient."""
    torch.manual_seed(4)
    x = F.relu(torch.randn(2, 4, 6, 6, requires_grad=True))
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    thr = torch.tensor(0.7)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = swat_conv2d(x, w, w.detach(), None, thr, padding=1)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    thr.fill_(100.0)                                   # e.g. the controller recomputed it before this backward
    y.sum().backward()
    ref = torch.nn.grad.conv2d_weight(sparsify(x.detach(), 0.7), w.shape, torch.ones_like(y), padding=1)
    torch.testing.assert_close(w.grad, ref)


def test_unbatched_conv_input_and_shape_errors():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(3, 8, 8)
    y = swat_conv2d(x, conv.weight, conv.weight.detach(), conv.bias, None, padding=1)
    assert torch.equal(y, conv(x))
    with pytest.raises(ValueError):
        swat_conv2d(x, conv.weight, conv.weight[:2].detach(), conv.bias, None)
    with pytest.raises(ValueError):
        swat_conv2d(x, conv.weight, conv.weight.detach(), conv.bias, None, stride=2, padding="same")
    with pytest.raises(ValueError):
        swat_conv2d(x, conv.weight, conv.weight.detach(), conv.bias, None, padding="full")
    with pytest.raises(ValueError):
        swat_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4, 3))


# ---------------------------------------------------------------- gradcheck


def test_gradcheck_conv_and_linear():
    """float64 gradcheck. With x_threshold None and weight_sparse = weight, SWAT is an ordinary conv/linear and the
    gradients w.r.t. x, weight and bias are the true derivatives, so gradcheck passes for all three. With sparse
    weights held fixed the forward depends on weight only through the detached weight_sparse, so SWAT's dW (built
    from X_s, to train the dense weight) is *not* the derivative of the forward and is not checked; dX is exact
    (the forward uses weight_sparse and dX is computed from it), so x alone is gradchecked with sparse weights and
    an activation threshold."""
    torch.manual_seed(4)
    dt = torch.float64
    x = torch.randn(2, 4, 5, 5, dtype=dt, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=dt, requires_grad=True)
    b = torch.randn(6, dtype=dt, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: swat_conv2d(x, w, w, b, None, stride=2, padding=1, dilation=1, groups=2), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: swat_conv2d(x, w, w, b, None, padding="same"), (x, w[:, :1]
                                    .repeat(1, 4, 1, 1).detach().requires_grad_(True), b))
    w_s = sparsify(w.detach(), magnitude_threshold(w, keep_count(w.numel(), 0.7)))
    thr = magnitude_threshold(x, keep_count(x.numel(), 0.8))
    assert torch.autograd.gradcheck(lambda x: swat_conv2d(x, w, w_s, b, thr, padding=1, groups=2), (x,))

    xl = torch.randn(3, 2, 7, dtype=dt, requires_grad=True)
    wl = torch.randn(5, 7, dtype=dt, requires_grad=True)
    bl = torch.randn(5, dtype=dt, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: swat_linear(x, w, w, b, None), (xl, wl, bl))
    wl_s = sparsify(wl.detach(), magnitude_threshold(wl, keep_count(wl.numel(), 0.6)))
    thr_l = magnitude_threshold(xl, keep_count(xl.numel(), 0.5))
    assert torch.autograd.gradcheck(lambda x: swat_linear(x, wl, wl_s, bl, thr_l), (xl,))


def test_double_backward_is_refused():
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = swat_conv2d(x, w, w, None, None)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


# ---------------------------------------------------------------- AMP


def test_bf16_autocast_conv_matches_autocast_nn_conv2d():
    torch.manual_seed(5)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(4, 8, 9, 9, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = conv(x)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    ref = _grads(x, conv.weight, conv.bias)
    x.grad = None
    conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = swat_conv2d(x, conv.weight, conv.weight.detach(), conv.bias, None, padding=1)
    assert y.dtype == torch.bfloat16
    y.backward(g)
    assert x.grad.dtype == conv.weight.grad.dtype == conv.bias.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(ref, _grads(x, conv.weight, conv.bias), strict=True):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=5e-2)


def test_bf16_autocast_sparse_conv_and_linear():
    """Sparse weights and an fp32 activation threshold under autocast: low-precision compute, fp32 parameter grads,
    and the saved X_s is the bf16 input masked at the fp32 threshold."""
    torch.manual_seed(6)
    x = torch.randn(4, 8, 9, 9, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    w_s, _ = topk_sparse(w, 0.9)
    _, thr = topk_sparse(x, 0.9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = swat_conv2d(x, w, w_s, b, thr, padding=1)
    assert y.dtype == torch.bfloat16
    g = torch.randn_like(y)
    y.backward(g)
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    xb = x.detach().bfloat16()
    x_s = torch.where(xb.float().abs() >= thr, xb, 0)
    dw = torch.nn.grad.conv2d_weight(x_s, w.shape, g, padding=1).float()
    torch.testing.assert_close(w.grad, dw, rtol=2e-2, atol=5e-2)
    dx = torch.nn.grad.conv2d_input(x.shape, w_s.bfloat16(), g, padding=1).float()
    torch.testing.assert_close(x.grad, dx, rtol=2e-2, atol=5e-2)

    xl = torch.randn(6, 32, requires_grad=True)
    wl = torch.randn(16, 32, requires_grad=True)
    wl_s, _ = topk_sparse(wl, 0.8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yl = swat_linear(xl, wl, wl_s, None, 0.5)
    assert yl.dtype == torch.bfloat16
    yl.float().sum().backward()
    assert wl.grad.dtype == torch.float32 and xl.grad.dtype == torch.float32


def test_compiles_without_graph_breaks():
    """torch.compile traces the Functions (the threshold is computed outside, as a 0-d tensor)."""
    torch._dynamo.reset()
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    w_s, _ = topk_sparse(w, 0.5)
    _, thr = topk_sparse(x, 0.5)

    def f(x, w, w_s, thr):
        return swat_conv2d(x, w, w_s, None, thr, padding=1).square().sum()

    explanation = torch._dynamo.explain(f)(x, w, w_s, thr)
    assert explanation.graph_break_count == 0
