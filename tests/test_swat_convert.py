"""convert_ / revert_ / hard_prune_, the SWAT layers and the controller (spec §1.3-1.4, §7 checks 1, 3, 4)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanprop
from leanprop import models
from leanprop.swat.layers import SWATConv2d, SWATLinear
from leanprop.swat.topk import keep_count


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_convert_reuses_parameters_and_keys():
    m = models.create("resnet20")
    params = {n: p for n, p in m.named_parameters()}
    keys = list(m.state_dict())
    ctl = leanprop.convert_(m, leanprop.SWATConfig(sparsity=0.9))
    assert all(p is params[n] for n, p in m.named_parameters())
    assert list(m.state_dict()) == keys
    assert sum(isinstance(x, (SWATConv2d, SWATLinear)) for x in m.modules()) == 20 == len(ctl.layers)
    plain = models.create("resnet20")
    plain.load_state_dict(m.state_dict(), strict=True)  # a SWAT-trained model loads into the plain model
    leanprop.revert_(m)
    assert not any(isinstance(x, (SWATConv2d, SWATLinear)) for x in m.modules())
    assert all(p is params[n] for n, p in m.named_parameters())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    assert opt.param_groups[0]["params"][0] is params["conv1.weight"]


def test_sparsity_zero_equals_plain_model():
    m = _tiny()
    ref = copy.deepcopy(m)
    leanprop.convert_(m, leanprop.SWATConfig(sparsity=0.0, sparsify_first_layer=True))
    x = torch.randn(4, 3, 8, 8)
    y, y_ref = m(x), ref(x)
    assert torch.equal(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (n, p), q in zip(m.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)


def test_first_last_layer_defaults_follow_official_configs():
    m = models.create("resnet20")
    u = leanprop.convert_(m, leanprop.SWATConfig(sparsity=0.9, distribution="uniform"))
    assert u.budget["conv1"] == 0.0 and u.budget["fc"] == pytest.approx(0.9)
    leanprop.revert_(m)
    assert leanprop.SWATConfig(distribution="erk").first_layer_sparse  # ERK/M: first layer sparse
    mom = leanprop.convert_(m, leanprop.SWATConfig(sparsity=0.9, distribution="momentum"))
    assert mom.budget["conv1"] == pytest.approx(0.9)  # SWAT-M starts uniform, first layer included


def test_overrides_and_filter_fn():
    m = models.create("resnet20")
    ctl = leanprop.convert_(m, leanprop.SWATConfig(sparsity=0.9, overrides={r"layer3\..*": 0.5}),
                            filter_fn=lambda name, mod: not name.startswith("layer1"))
    assert not any(n.startswith("layer1") for n in ctl.layers)
    assert ctl.budget["layer3.0.conv1"] == 0.5 and ctl.budget["layer2.0.conv1"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="revert_"):
        leanprop.convert_(m, leanprop.SWATConfig())
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        leanprop.convert_(nn.Sequential(nn.ReLU()), leanprop.SWATConfig())


def test_training_step_semantics_and_pruned_weights_learn():
    m = _tiny()
    ctl = leanprop.convert_(m, leanprop.SWATConfig(sparsity=0.75, sparsify_first_layer=True))
    layer = m[3]
    x = torch.randn(4, 3, 8, 8)
    inp = {}
    layer.register_forward_hook(lambda mod, i, o: inp.update(x=i[0].detach()))  # returns None: output kept
    m(x).sum().backward()
    w = layer.weight.detach()
    k = keep_count(w.numel(), 0.75)
    assert int((w.abs() >= layer.w_threshold).sum()) == k  # exact Top-K of the weights (no ties here)
    xin = inp["x"]
    kx = keep_count(xin.numel(), 0.75)
    thr_x = torch.topk(xin.abs().flatten(), kx).values[-1]
    assert layer.x_threshold == thr_x  # activation K over N*C*H*W
    pruned = w.abs() < layer.w_threshold
    assert (layer.weight.grad[pruned] != 0).any()  # dense dW: pruned weights keep learning
    assert ctl.step_count == 0


def test_topk_period_reuses_thresholds():
    m = _tiny()
    ctl = leanprop.convert_(m, leanprop.SWATConfig(sparsity=0.8, topk_period=3, sparsify_first_layer=True))
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
    ctl.attach_optimizer(opt)
    layer = m[3]
    seen = []
    for step in range(7):
        x = torch.randn(4, 3, 8, 8) * (1 + step)
        m(x).square().mean().backward()
        seen.append((layer.w_threshold.item(), layer.x_threshold.item()))
        opt.step()
        opt.zero_grad()
        ctl.step()
    changes = [i for i in range(1, 7) if seen[i] != seen[i - 1]]
    assert changes == [3, 6]


def test_exact_topk_epochs_recompute_every_step():
    m = _tiny()
    ctl = leanprop.convert_(m, leanprop.SWATConfig(sparsity=0.8, topk_period=100, exact_topk_epochs=1))
    ctl.on_epoch_start(0)
    ctl.step()
    assert all(layer.recompute for layer in ctl.layers.values())
    ctl.on_epoch_start(1)
    assert not any(layer.recompute for layer in ctl.layers.values())


def test_eval_uses_sparse_weights_and_skips_activation_topk():
    m = _tiny()
    leanprop.convert_(m, leanprop.SWATConfig(sparsity=0.8, sparsify_first_layer=True))
    layer = m[3]
    m.eval()
    x = torch.randn(2, 8, 4, 4)
    before = layer.x_threshold.clone()
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(layer.x_threshold, before)
    w_s = layer.weight * (layer.weight.abs() >= layer.w_threshold)
    torch.testing.assert_close(y, F.conv2d(x, w_s, None, 2, 1))
    layer.sparse_eval = False
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, None, 2, 1))


@pytest.mark.parametrize("structure", ["channel", "filter"])
def test_structured_layers_zero_whole_kernels(structure):
    m = models.create("resnet20")
    ctl = leanprop.convert_(m, leanprop.SWATConfig(sparsity=0.5, structure=structure))
    layer = ctl.layers["layer2.0.conv2"]
    mask = layer.weight_mask()
    per_kernel = mask.flatten(2).any(2) if structure == "channel" else mask.flatten(1).any(1)
    full = mask.flatten(2).all(2) if structure == "channel" else mask.flatten(1).all(1)
    assert torch.equal(per_kernel, full)  # kernels / filters are kept or dropped whole
    assert int(per_kernel.sum()) == keep_count(per_kernel.numel(), 0.5)


def test_hard_prune_summary_and_state_dict_roundtrip():
    m = models.create("resnet20")
    ctl = leanprop.convert_(m, leanprop.SWATConfig(sparsity=0.9))
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    state = ctl.state_dict()
    m2 = copy.deepcopy(m)
    leanprop.revert_(m2)
    ctl2 = leanprop.convert_(m2, leanprop.SWATConfig(sparsity=0.9))
    ctl2.load_state_dict(state)
    for name, layer in ctl.layers.items():
        assert torch.equal(layer.x_threshold, ctl2.layers[name].x_threshold)
    text = ctl.summary()
    assert "layer3.2.conv2" in text and "90.0%" in text
    result = leanprop.hard_prune_(m)
    assert result["conv1"] == 0.0
    w = m.layer2[0].conv1.weight
    assert int(torch.count_nonzero(w)) == keep_count(w.numel(), 0.9)
    assert result["layer2.0.conv1"] == pytest.approx(0.9, abs=1e-3)


@pytest.mark.parametrize("name", [*models.list_models("cifar"), "resnet18"])
def test_every_zoo_model_trains_a_step_with_swat_erk(name, one_thread):
    torch.manual_seed(0)
    m = models.create(name)
    ctl = leanprop.convert_(m, leanprop.SWATConfig(sparsity=0.9, distribution="erk"))
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    ctl.attach_optimizer(opt)
    size = models.model_info(name).input_size if models.model_info(name).family == "cifar" else 64
    out = m(torch.randn(2, 3, size, size))
    out.logsumexp(1).mean().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    opt.step()
    ctl.step()
    total = sum(layer.weight.numel() for layer in ctl.layers.values())
    kept = sum((1 - ctl.budget[n]) * layer.weight.numel() for n, layer in ctl.layers.items())
    assert kept / total == pytest.approx(0.1, abs=0.01)  # ERK: the overall density is the target
