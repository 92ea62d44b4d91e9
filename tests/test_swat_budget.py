"""SWAT per-layer budgets (spec shared/specs/swat.md §1.4, §1.5; acceptance checks 5 and 6 of §7)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import leanprop
from leanprop import models
from leanprop.swat.budget import LayerSpec, assign_budget, collect_layers, uncovered_layers
from leanprop.swat.config import SWATConfig
from leanprop.swat.momentum import (
    MomentumRedistributor,
    check_optimizer_supports_momentum,
    mean_abs_momentum,
)

_MODELS: dict[str, nn.Module] = {}


def _model(name: str) -> nn.Module:
    if name not in _MODELS:
        _MODELS[name] = models.create(name)
    return _MODELS[name]


def _official_weight_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """What the official code budgets: named_parameters minus biases and BatchNorm parameters, in order."""
    bn = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    out = []
    for pname, p in model.named_parameters():
        module = pname.rsplit(".", 1)[0]
        if "bias" in pname or module in bn:
            continue
        out.append((module, tuple(p.shape)))
    return out


def _official_erk(shapes: list[tuple[str, tuple[int, ...]]], density: float) -> dict[str, float]:
    """RigL/SWAT ERK written out plainly (every layer sparse at init, as in the shipped ERK configs)."""
    n = {name: int(np.prod(shape)) for name, shape in shapes}
    zeros = {name: n[name] * (1 - density) for name, _ in shapes}  # the 'constant' init
    dense: set[str] = set()
    while True:
        rhs = 0.0
        divisor = 0.0
        raw = {}
        for name, shape in shapes:
            if name in dense:
                rhs -= zeros[name]
            else:
                rhs += n[name] - zeros[name]
                raw[name] = np.sum(shape) / np.prod(shape)
                divisor += raw[name] * n[name]
        eps = rhs / divisor
        max_prob = max(raw.values())
        if max_prob * eps > 1:
            dense |= {name for name, p in raw.items() if p == max_prob}
        else:
            break
    return {name: (0.0 if name in dense else 1.0 - eps * raw[name]) for name, _ in shapes}


# --------------------------------------------------------------------------------------------------------
# layers


def test_collect_layers_order_kinds_and_subclasses():
    class MyConv(nn.Conv2d):
        pass

    net = nn.Sequential(MyConv(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Conv2d(4, 2, 1)), nn.Flatten(),
                        nn.Linear(8, 5, bias=False))
    layers = collect_layers(net)
    assert [(lay.name, lay.kind, lay.shape) for lay in layers] == [
        ("0", "conv", (4, 3, 3, 3)), ("2.0", "conv", (2, 4, 1, 1)), ("4", "linear", (5, 8))]
    assert layers[0].numel == 108


def test_layers_swat_cannot_run_are_left_out_and_named():
    """nn.MultiheadAttention reads out_proj.weight without calling out_proj: a SWAT layer there would never run
    (its reported sparsity and the final prune would then be wrong); 1-D / 3-D / transposed convs are not SWAT's."""

    class Hybrid(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv1d(3, 8, 3)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.up = nn.ConvTranspose2d(8, 8, 2)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            t = self.stem(x).transpose(1, 2)
            return self.fc(self.attn(t, t, t)[0].mean(1))

    net = Hybrid()
    assert [lay.name for lay in collect_layers(net)] == ["fc"]
    assert uncovered_layers(net) == ["stem (Conv1d)", "attn.out_proj (read directly by its MultiheadAttention)",
                                     "up (ConvTranspose2d)"]
    with pytest.warns(UserWarning, match=r"left dense: stem \(Conv1d\), attn.out_proj"):
        leanprop.convert_(net, SWATConfig(sparsity=0.5, sparsify_last_layer=True))
    assert type(net.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm. is deprecated")
def test_layers_with_a_computed_weight_are_left_dense_and_named():
    """weight_norm / spectral_norm compute ``weight`` from other tensors (a parametrization, or the older forward
    pre-hook): SWAT's layer would need a Parameter to sparsify, so such a layer stays as it is (converting it was a
    TypeError) and the warning names it."""
    from torch.nn.utils import parametrizations, weight_norm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), parametrizations.weight_norm(nn.Conv2d(8, 8, 3)),
                        nn.ReLU(), parametrizations.spectral_norm(nn.Conv2d(8, 8, 1)), weight_norm(nn.Conv2d(8, 8, 1)),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    keys = list(net.state_dict())
    assert [lay.name for lay in collect_layers(net)] == ["0", "8"]
    assert [u.split(" ")[0] for u in uncovered_layers(net)] == ["2", "4", "5"]
    with pytest.warns(UserWarning, match=r"left dense: 2 \(ParametrizedConv2d whose weight is computed"):
        ctl = leanprop.convert_(net, SWATConfig(sparsity=0.5, sparsify_last_layer=True))
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    ctl.step()
    assert list(net.state_dict()) == keys
    leanprop.revert_(net)
    assert list(net.state_dict()) == keys


@pytest.mark.parametrize("name, count", [("cifar_vgg16", 16), ("wrn16_8", 17), ("cifar_densenet121", 121)])
def test_layers_match_official_bookkeeping(name, count):
    net = _model(name)
    layers = collect_layers(net)
    assert len(layers) == count
    assert [(lay.name, lay.shape) for lay in layers] == _official_weight_shapes(net)


# --------------------------------------------------------------------------------------------------------
# ERK (check 5)


@pytest.mark.parametrize("name, sparsity", [("cifar_vgg16", 0.95), ("cifar_vgg16", 0.9), ("wrn16_8", 0.95),
                                            ("wrn16_8", 0.9), ("cifar_densenet121", 0.9)])
def test_erk_equals_official_formula(name, sparsity):
    net = _model(name)
    cfg = SWATConfig(sparsity=sparsity, distribution="erk")
    assert cfg.first_layer_sparse and cfg.last_layer_sparse  # the official ERK configs
    got = assign_budget(collect_layers(net), cfg)
    shapes = _official_weight_shapes(net)
    want = _official_erk(shapes, 1 - sparsity)
    assert list(got) == list(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert all(0.0 <= s < 1.0 for s in got.values())
    n_total = sum(int(np.prod(s)) for _, s in shapes)
    nonzeros = sum((1 - got[k]) * int(np.prod(s)) for k, s in shapes)
    assert abs(nonzeros - (1 - sparsity) * n_total) < 1.0


def test_erk_dense_set_iteration_on_vgg95():
    budget = assign_budget(collect_layers(_model("cifar_vgg16")), SWATConfig(sparsity=0.95, distribution="erk"))
    dense = [k for k, s in budget.items() if s == 0.0]
    # the 3x3x3 stem and the 4096->10 classifier have the largest raw scores and end up dense
    assert dense == ["features.0", "classifier.6"]
    assert budget["classifier.3"] > budget["classifier.0"] > 0.8


def test_erk_first_layer_dense_is_outside_the_budget():
    layers = collect_layers(_model("wrn16_8"))
    cfg = SWATConfig(sparsity=0.9, distribution="erk", sparsify_first_layer=False)
    budget = assign_budget(layers, cfg)
    assert budget[layers[0].name] == 0.0
    rest = layers[1:]
    want = _official_erk([(lay.name, lay.shape) for lay in rest], 0.1)
    for lay in rest:
        assert budget[lay.name] == pytest.approx(want[lay.name], abs=1e-12)
    kept = sum((1 - budget[lay.name]) * lay.numel for lay in rest)
    assert abs(kept - 0.1 * sum(lay.numel for lay in rest)) < 1.0


def test_erk_last_layer_flag():
    layers = collect_layers(_model("cifar_densenet121"))
    budget = assign_budget(layers, SWATConfig(sparsity=0.9, distribution="erk", sparsify_last_layer=False))
    assert budget["fc"] == 0.0 and budget["conv1"] > 0.0


# --------------------------------------------------------------------------------------------------------
# uniform, flags, overrides


def test_uniform_with_first_last_flags():
    layers = collect_layers(_model("cifar_vgg16"))
    names = [lay.name for lay in layers]
    u = assign_budget(layers, SWATConfig(sparsity=0.9))  # official U: first dense, last sparse
    assert u[names[0]] == 0.0 and all(u[n] == 0.9 for n in names[1:])
    both = assign_budget(layers, SWATConfig(sparsity=0.9, sparsify_first_layer=True, sparsify_last_layer=False))
    assert both[names[0]] == 0.9 and both[names[-1]] == 0.0 and both[names[5]] == 0.9
    structured = assign_budget(layers, SWATConfig(sparsity=0.5, structure="channel"))
    assert structured[names[0]] == 0.0
    m = assign_budget(layers, SWATConfig(sparsity=0.95, distribution="momentum"))  # M starts uniform, first sparse
    assert set(m.values()) == {0.95}


def test_overrides_by_name_and_regex():
    layers = collect_layers(_model("cifar_vgg16"))
    cfg = SWATConfig(sparsity=0.9, overrides={"classifier.6": 0.0, r"classifier\.[03]": 0.99, "features.4.*": 0.5})
    b = assign_budget(layers, cfg)
    assert b["classifier.6"] == 0.0 and b["classifier.0"] == 0.99 and b["classifier.3"] == 0.99
    assert b["features.40"] == 0.5 and b["features.3"] == 0.9
    # fullmatch: "features.1" must not hit features.10, features.14, ...
    b2 = assign_budget(layers, SWATConfig(sparsity=0.9, overrides={"features.10": 0.3}))
    assert b2["features.10"] == 0.3 and b2["features.14"] == 0.9
    erk = assign_budget(layers, SWATConfig(sparsity=0.9, distribution="erk", overrides={"features.0": 0.25}))
    assert erk["features.0"] == 0.25
    with pytest.raises(ValueError, match="matches no"):
        assign_budget(layers, SWATConfig(sparsity=0.9, overrides={"nope": 0.5}))


# --------------------------------------------------------------------------------------------------------
# SWAT-M (check 6)


def _plain_regrowth(mom: list[float], sizes: list[int], density: float, freeze: float = 0.99,
                    max_iter: int = 1000) -> list[int]:
    """The official sparsity_regrowth, written out with lists."""
    total_m = sum(mom)
    share = [m / total_m for m in mom]
    n_total = sum(sizes)
    target = density * n_total
    alloc: list[int | None] = [None] * len(sizes)
    mean_residual, residual, total_nz, it = 0, 9999, 0, 0
    while residual > 0 and it < max_iter:
        if total_nz > target:
            break
        residual, total_nz = 0, 0
        for i, n in enumerate(sizes):
            r = (math.ceil(share[i] * density * n_total) if alloc[i] is None else alloc[i]) + mean_residual
            if r > freeze * n:
                alloc[i] = n
                residual += r - n
            else:
                alloc[i] = r
            total_nz += alloc[i]
        if residual > len(sizes):
            mean_residual = math.ceil(residual / len(sizes))
        else:
            residual = 0
        it += 1
    return alloc


def _fixed_momentum(layers: list[LayerSpec]) -> dict[str, float]:
    # deterministic, uneven; the tiny stem and classifier get a lot so they hit the 0.99 freeze
    mom = {lay.name: 1.0 + (i % 5) * 0.37 for i, lay in enumerate(layers)}
    mom[layers[0].name] = 40.0
    mom[layers[-1].name] = 25.0
    return mom


@pytest.mark.parametrize("name, sparsity", [("cifar_vgg16", 0.95), ("wrn16_8", 0.95), ("cifar_densenet121", 0.9)])
def test_momentum_matches_plain_recomputation(name, sparsity):
    layers = collect_layers(_model(name))
    cfg = SWATConfig(sparsity=sparsity, distribution="momentum")
    red = MomentumRedistributor(layers, cfg)
    mom = _fixed_momentum(layers)
    budget = red.update(mom)
    sizes = [lay.numel for lay in layers]
    want = _plain_regrowth([mom[lay.name] for lay in layers], sizes, 1 - sparsity)
    assert list(red.nonzeros.values()) == want
    for lay, k in zip(layers, want, strict=True):
        assert budget[lay.name] == 1 - k / lay.numel
        assert 0.0 <= budget[lay.name] < 1.0
    frozen = [lay.name for lay in layers if budget[lay.name] == 0.0]
    assert layers[0].name in frozen and layers[-1].name in frozen  # the 0.99 freeze made them dense
    target = (1 - sparsity) * sum(sizes)
    assert abs(sum(want) - target) <= 3 * len(layers)  # ceil rounding, a few passes


def test_momentum_orders_layers_and_keeps_total():
    layers = [LayerSpec(f"l{i}", "conv", (64, 64, 3, 3)) for i in range(4)]
    red = MomentumRedistributor(layers, SWATConfig(sparsity=0.9, distribution="momentum"))
    assert set(red.budget.values()) == {0.9}  # uniform start, first layer sparse for M
    b = red.update({"l0": 4.0, "l1": 3.0, "l2": 2.0, "l3": 1.0})
    assert b["l0"] < b["l1"] < b["l2"] < b["l3"]  # more momentum -> more non-zeros
    # nz_l = ceil(m_l * d * N_total) = ceil({0.4, 0.3, 0.2, 0.1} * 14745.6)
    assert red.nonzeros == {"l0": 5899, "l1": 4424, "l2": 2950, "l3": 1475}
    assert 0 <= sum(red.nonzeros.values()) - 0.1 * 4 * 36864 < 4


def test_momentum_zero_fallback_keeps_budget():
    layers = collect_layers(_model("wrn16_8"))
    red = MomentumRedistributor(layers, SWATConfig(sparsity=0.95, distribution="momentum"))
    start = red.budget
    assert red.update(dict.fromkeys(start, 0.0)) == start
    assert red.update(dict.fromkeys(start)) == start  # no optimizer state yet
    assert red.update({}) == start
    assert red.fallbacks == 3 and red.steps == 0
    moved = red.update(_fixed_momentum(layers))
    assert moved != start
    assert red.update(dict.fromkeys(start, float("nan"))) == moved  # keeps the *previous* budget
    with pytest.raises(ValueError, match="unknown layers"):
        red.update({"nope": 1.0})


def test_momentum_state_dict_round_trip_is_bit_identical():
    layers = collect_layers(_model("cifar_vgg16"))
    cfg = SWATConfig(sparsity=0.95, distribution="momentum")
    a = MomentumRedistributor(layers, cfg)
    rng = np.random.default_rng(0)
    for _ in range(3):
        a.update({lay.name: float(rng.random()) for lay in layers})
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = MomentumRedistributor(layers, cfg)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.budget == a.budget and b.nonzeros == a.nonzeros and b.steps == a.steps
    assert b.update({}) == a.update({})  # fallback returns the restored budget
    step = {lay.name: float(rng.random()) for lay in layers}
    assert b.update(step) == a.update(step)
    with pytest.raises(ValueError, match="different layers"):
        MomentumRedistributor(layers[:-1], cfg).load_state_dict(a.state_dict())


def test_momentum_overridden_layers_are_pinned():
    layers = [LayerSpec(f"l{i}", "linear", (100, 100)) for i in range(3)]
    cfg = SWATConfig(sparsity=0.8, distribution="momentum", overrides={"l2": 0.5})
    red = MomentumRedistributor(layers, cfg)
    b = red.update({"l0": 1.0, "l1": 3.0, "l2": 100.0})
    assert b["l2"] == 0.5
    assert abs(red.nonzeros["l0"] + red.nonzeros["l1"] - 0.2 * 20000) <= 2  # d * N over the free layers


def _tiny_step(opt_cls, **kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    opt = opt_cls(net.parameters(), lr=0.1, **kw)
    if opt_cls is not torch.optim.Adagrad:  # Adagrad creates its state in __init__
        assert mean_abs_momentum(opt, net[0].weight) is None  # no state before the first step
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
    return net, opt


def test_mean_abs_momentum_sgd_with_mask():
    net, opt = _tiny_step(torch.optim.SGD, momentum=0.9)
    w = net[0].weight
    mask = w.abs() >= w.abs().flatten().kthvalue(15).values
    buf = opt.state[w]["momentum_buffer"]
    assert mean_abs_momentum(opt, w, mask) == pytest.approx(buf.abs()[mask].mean().item(), rel=1e-6)
    assert mean_abs_momentum(opt, w) == pytest.approx(buf.abs().mean().item(), rel=1e-6)
    assert mean_abs_momentum(opt, w, torch.zeros_like(mask)) == 0.0
    check_optimizer_supports_momentum(opt)


def test_mean_abs_momentum_adam():
    net, opt = _tiny_step(torch.optim.Adam)
    w = net[2].weight
    st = opt.state[w]
    want = (st["exp_avg"] / (st["exp_avg_sq"].sqrt() + 1e-8)).abs().mean().item()
    assert mean_abs_momentum(opt, w) == pytest.approx(want, rel=1e-6)
    check_optimizer_supports_momentum(opt)
    layers = collect_layers(net)
    red = MomentumRedistributor(layers, SWATConfig(sparsity=0.5, distribution="momentum"))
    b = red.update_from_optimizer(opt, {n: m.weight for n, m in net.named_modules() if isinstance(m, nn.Linear)})
    assert red.steps == 1 and all(0.0 <= s < 1.0 for s in b.values())


def test_optimizer_without_momentum_is_rejected_clearly():
    net, opt = _tiny_step(torch.optim.SGD, momentum=0.0)
    assert mean_abs_momentum(opt, net[0].weight) is None  # momentum_buffer is None
    with pytest.raises(ValueError, match="SGD with momentum > 0"):
        check_optimizer_supports_momentum(opt)
    net, opt = _tiny_step(torch.optim.Adagrad)
    with pytest.raises(ValueError, match="SGD with momentum > 0"):
        check_optimizer_supports_momentum(opt)
    with pytest.raises(ValueError, match="cannot read momentum"):
        mean_abs_momentum(opt, net[0].weight)
