"""Filter-structured SWAT computing only the kept filters (issue 5: real speed): same results as masking."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import leanprop
from leanprop import models
from leanprop.swat import functions as swat_functions
from leanprop.swat.functions import swat_conv2d, swat_filter_conv2d
from leanprop.swat.layers import SWATConv2d
from leanprop.swat.topk import keep_count, magnitude_threshold, structured_keep_mask


def _run(fn, x0, w0, b0, g, **kw):
    x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    b = None if b0 is None else b0.clone().requires_grad_(True)
    y = fn(x, w, b, **kw)
    y.backward(g)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("amp", [False, True])
def test_kept_filter_conv_equals_the_masked_swat_conv(channels_last, bias, stride, amp):
    torch.manual_seed(0)
    x0, w0 = torch.relu(torch.randn(4, 8, 9, 9)), torch.randn(12, 8, 3, 3)
    b0 = torch.randn(12) if bias else None
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    mask = structured_keep_mask(w0, 0.7, "filter")
    keep = mask.view(-1).nonzero().view(-1)
    thr = magnitude_threshold(x0, keep_count(x0.numel(), 0.9))
    g = torch.randn(4, 12, *torch.nn.functional.conv2d(x0, w0, stride=stride, padding=1).shape[2:])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        ref = _run(lambda x, w, b: swat_conv2d(x, w, (w * mask).detach(), b, thr, stride=stride, padding=1),
                   x0, w0, b0, g)
        out = _run(lambda x, w, b: swat_filter_conv2d(x, w, keep, b, thr, stride=stride, padding=1), x0, w0, b0, g)
    tol = dict(rtol=2e-2, atol=2e-2) if amp else dict(rtol=1e-5, atol=1e-5)
    for a, c in zip(ref, out, strict=True):
        if a is not None:
            assert a.dtype == c.dtype and a.shape == c.shape
            assert torch.allclose(a.float(), c.float(), **tol)
    if channels_last:
        assert out[0].is_contiguous(memory_format=torch.channels_last)
    assert (out[2][~mask.view(-1)] != 0).any()  # the paper's semantics: pruned filters get their gradient


def test_dense_grad_false_skips_the_pruned_filters_weight_gradient():
    torch.manual_seed(0)
    x0, w0 = torch.randn(2, 4, 6, 6), torch.randn(8, 4, 3, 3)
    keep = torch.tensor([1, 4, 6])
    g = torch.randn(2, 8, 6, 6)
    dense = _run(lambda x, w, b: swat_filter_conv2d(x, w, keep, b, None, padding=1), x0, w0, None, g)
    part = _run(lambda x, w, b: swat_filter_conv2d(x, w, keep, b, None, padding=1, dense_grad=False),
                x0, w0, None, g)
    assert torch.equal(dense[0], part[0]) and torch.allclose(dense[1], part[1])
    pruned = torch.ones(8, dtype=torch.bool)
    pruned[keep] = False
    assert (part[2][pruned] == 0).all() and torch.allclose(part[2][keep], dense[2][keep], atol=1e-5)
    with pytest.raises(ValueError, match="int64"):
        swat_filter_conv2d(x0, w0, keep.int())


def _grads(model, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_filter_layers_use_the_kept_filter_path_and_match_masking(monkeypatch):
    torch.manual_seed(0)
    plain = models.create("resnet20")
    a, b = copy.deepcopy(plain), copy.deepcopy(plain)
    leanprop.convert_(a, leanprop.SWATConfig(sparsity=0.7, structure="filter", structured_compute=False))
    leanprop.convert_(b, leanprop.SWATConfig(sparsity=0.7, structure="filter"))
    calls = []
    real = swat_functions._SWATFilterConv2d.apply
    monkeypatch.setattr(swat_functions._SWATFilterConv2d, "apply", lambda *args: calls.append(1) or real(*args))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    ga, gb = _grads(a, x, y), _grads(b, x, y)
    n_filter = sum(isinstance(m, SWATConv2d) and m.computes_kept_filters() for m in b.modules())
    assert n_filter == len(calls) == 18  # every 3x3 conv but the (dense) first one
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-4, atol=1e-5), n


def test_dense_grad_period_sets_the_layer_flag_every_p_steps():
    model = models.create("resnet8")
    ctl = leanprop.convert_(model, leanprop.SWATConfig(sparsity=0.5, structure="filter", dense_grad_period=3))
    layer = next(m for m in model.modules() if isinstance(m, SWATConv2d) and m.sparsity > 0)
    seen = []
    for _ in range(7):
        seen.append(layer.dense_grad)
        ctl.step()
    assert seen == [True, False, False, True, False, False, True]
    with pytest.raises(ValueError, match="dense_grad_period"):
        leanprop.SWATConfig(dense_grad_period=0)
