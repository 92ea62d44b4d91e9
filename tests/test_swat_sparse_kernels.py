"""SWAT's CSR kernels (issue 5): same results as the dense kernels, and the measured per-layer choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from leanprop import models
from leanprop.nn.convert import convert_
from leanprop.ops import sparse_storage
from leanprop.swat import sparse_kernels as sk
from leanprop.swat.config import SWATConfig
from leanprop.swat.functions import swat_conv2d, swat_linear
from leanprop.swat.topk import keep_count, magnitude_threshold, sparsify


def _topk(t: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    thr = magnitude_threshold(t, keep_count(t.numel(), s))
    return sparsify(t, thr), thr


CSR_FORMATS = [f for f in sk.FORMATS if f not in sk.COMPILED]  # compiled kernels: tests/test_sparse_conv.py
CONV = [dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1)), dict(stride=(2, 2), padding=(1, 1), dilation=(1, 1)),
        dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1)), dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1))]


@pytest.mark.parametrize("conf", CONV)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("fmt", CSR_FORMATS)
def test_conv_kernels_match_dense(conf, channels_last, fmt):
    g0 = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 9, 8, generator=g0, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w_s, _ = _topk(torch.randn(5, 6, 3, 3, generator=g0, dtype=torch.float64), 0.8)
    x_s, _ = _topk(x, 0.9)
    b = torch.randn(5, generator=g0, dtype=torch.float64)
    args = (conf["stride"], conf["padding"], conf["dilation"])
    y = F.conv2d(x, w_s, b, *args)
    got = sk.conv_forward(x, w_s, b, *args, fmt)
    torch.testing.assert_close(got, y)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    g = torch.randn(y.shape, generator=g0, dtype=torch.float64)
    dx, dw, _ = torch.ops.aten.convolution_backward(g, x_s, w_s, None, *map(list, args), False, [0, 0], 1,
                                                    [True, True, False])
    torch.testing.assert_close(sk.conv_grad_input(g, w_s, x.shape, *args, fmt), dx)
    torch.testing.assert_close(sk.conv_grad_weight(x_s, g, w_s.shape, *args, fmt), dw)


@pytest.mark.parametrize("fmt", CSR_FORMATS)
def test_linear_kernels_match_dense(fmt):
    g0 = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 10, generator=g0, dtype=torch.float64)
    w_s, _ = _topk(torch.randn(4, 10, generator=g0, dtype=torch.float64), 0.7)
    b = torch.randn(4, generator=g0, dtype=torch.float64)
    g = torch.randn(2, 7, 4, generator=g0, dtype=torch.float64)
    x_s, _ = _topk(x, 0.9)
    torch.testing.assert_close(sk.linear_forward(x, w_s, b, fmt), F.linear(x, w_s, b))
    torch.testing.assert_close(sk.linear_grad_input(g, w_s, x.shape, fmt), g @ w_s)
    torch.testing.assert_close(sk.linear_grad_weight(x_s, g, w_s.shape, fmt),
                               g.reshape(-1, 4).t() @ x_s.reshape(-1, 10))


def _run(fn, x, w, *rest, **kw):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w, *rest, **kw)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape))
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("ops", [("csr", None, None), (None, "coo", None), (None, None, "csr"), ("coo",) * 3,
                                 (True, False, True)])
def test_swat_functions_on_csr_kernels_equal_dense_kernels(ops):
    g0 = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(2, 4, 6, 6, generator=g0, dtype=torch.float64))
    w = torch.randn(6, 4, 3, 3, generator=g0, dtype=torch.float64)
    w_s, _ = _topk(w, 0.9)
    _, thr = _topk(x, 0.8)
    for compress in (False, True):
        ref = _run(swat_conv2d, x, w, w_s, None, thr, 2, 1, compress=compress)
        got = _run(swat_conv2d, x, w, w_s, None, thr, 2, 1, compress=compress, sparse_ops=ops)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b)
    xl, wl = torch.randn(5, 8, generator=g0, dtype=torch.float64), torch.randn(3, 8, generator=g0, dtype=torch.float64)
    wl_s, _ = _topk(wl, 0.5)
    _, thr_l = _topk(xl, 0.5)
    ref = _run(swat_linear, xl, wl, wl_s, None, thr_l)
    got = _run(swat_linear, xl, wl, wl_s, None, thr_l, sparse_ops=ops)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_csr_path_gradcheck():
    """Nothing pruned, so the SWAT gradient is the true gradient: float64 gradcheck through the CSR kernels."""
    g0 = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 5, 5, generator=g0, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, generator=g0, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: swat_conv2d(x, w, w.detach(), b, None, 1, 1, sparse_ops=(True,) * 3), (x, w, b))
    xl = torch.randn(3, 4, generator=g0, dtype=torch.float64, requires_grad=True)
    wl = torch.randn(2, 4, generator=g0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: swat_linear(x, w, w.detach(), None, sparse_ops=(True,) * 3),
                                    (xl, wl))


def test_grouped_conv_and_unknown_format_are_rejected():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="groups=1"):
        swat_conv2d(x, w, w, groups=2, sparse_ops=("csr", None, None))
    with pytest.raises(ValueError, match="csr, coo"):
        swat_linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, 3), sparse_ops=("bsr", None, None))


def test_config_rejects_unknown_sparse_kernels():
    with pytest.raises(ValueError, match="sparse_kernels"):
        SWATConfig(sparse_kernels="fast")


def _fake_timer(sparse_wins: dict[str, str]):
    """ms = 1 for the winning path: the format ``sparse_wins[op]`` for the ops there, dense otherwise."""
    calls = []

    def timer(name, path, fn, reps):
        calls.append((name, path))
        return 1.0 if path == sparse_wins.get(timer.op, "dense") else 2.0

    timer.calls, timer.op = calls, None
    return timer


def _resnet(**cfg):
    torch.manual_seed(0)
    model = models.create("resnet8", num_classes=10)
    return model, convert_(model, SWATConfig(sparsity=0.9, topk_period=1, **cfg))


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_calibration_and_steps_take_padding_modes(mode):
    """A conv padded by another mode runs on the explicitly padded input with zero conv padding (a pair, as the
    kernels' checks read it); calibration, the chosen kernels and a training step then work as for zero padding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, padding_mode=mode),
                          nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 4))
    ctl = convert_(model, SWATConfig(sparsity=0.9, topk_period=1))
    x = torch.randn(16, 3, 8, 8)
    ctl.calibrate_kernels(x, timer=lambda name, path, fn, reps: 0.5 if path != "dense" else 1.0)
    h = model[1](model[0](x))
    ref = F.conv2d(F.pad(h, (1, 1, 1, 1), mode=mode), model[2].weight * model[2].weight_mask(), model[2].bias)
    torch.testing.assert_close(model[2](h), ref.detach())
    model(x).sum().backward()
    ctl.step()
    assert all(p.grad is not None for p in model.parameters())


def test_calibration_sets_the_measured_choice_and_leaves_training_state():
    model, ctl = _resnet()
    assert ctl.needs_kernel_calibration
    assert all(layer.sparse_ops == sk.NO_SPARSE for layer in ctl.layers.values())
    calls = []

    def timer(name, path, fn, reps):  # pointwise wins where offered, then rows, direct and CSR; COO loses
        calls.append((name, path))
        return {"dense": 2.0, "pointwise": 0.5, "rows": 0.8, "direct": 1.0, "csr": 1.0, "coo": 3.0}[path]

    timer.calls = calls
    bn = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 3, 16, 16)  # 16: no lanes of the direct kernel's layout are padding
    rng = torch.get_rng_state()
    timings = ctl.calibrate_kernels(x, timer=timer)
    assert not ctl.needs_kernel_calibration
    assert torch.equal(torch.get_rng_state(), rng)  # no draw from the training RNG
    for k, v in model.state_dict().items():  # BN running statistics untouched (eval-mode forward)
        torch.testing.assert_close(v, bn[k], rtol=0, atol=0)
    assert model.training
    eligible = [n for n, layer in ctl.layers.items() if sk.eligible(layer) is None]
    assert eligible and len(timings) == 3 * len(eligible)
    for n, layer in ctl.layers.items():
        if n not in eligible:
            assert layer.sparse_ops == sk.NO_SPARSE
        elif isinstance(layer, nn.Linear) or layer.kernel_size == (1, 1):  # pointwise forward and dX, direct dW
            assert layer.sparse_ops == ("pointwise", "pointwise", "direct")
        elif layer.stride == (1, 1):  # k×k stride 1: rows forward and dX (tried although direct wins clearly too),
            rows = [t for t in timings if t.layer == n and t.op == "forward"][0]  # unless its workspace is too big
            wide = "rows: workspace over 2x" in rows.note or "as " in rows.note and layer.sparse_ops[0] == "direct"
            assert layer.sparse_ops == (("direct",) * 3 if wide else ("rows", "rows", "direct"))
        else:  # the direct kernel wins all three ops (it is tried before CSR, which only ties it)
            assert layer.sparse_ops == ("direct", "direct", "direct")
    assert any(isinstance(ctl.layers[n], nn.Linear) for n in eligible)
    assert any(layer.sparse_ops[0] == "rows" for layer in ctl.layers.values())
    notes = [t.note for t in timings if t.op == "grad_weight" and not t.note.startswith("as ")]
    assert any("workspace over 2x" in note for note in notes)
    # identical shapes are timed once
    assert len(timer.calls) < (1 + len(sk.FORMATS)) * len(timings) and any(t.note.startswith("as ") for t in timings)
    assert "sparse" in sk.format_table(timings)
    assert ctl.kernel_summary().startswith("SWAT sparse kernels: ") and "timing took" in ctl.kernel_summary()


def test_calibration_of_packed_layers_times_dw_as_their_backward_pays_it(monkeypatch):
    """compress_saved: the grad-weight trials expand the packed X_s first (dense, CSR, COO), except the direct
    kernel, which reads the packed form; every trial's result is still checked against the dense one."""
    _, ctl = _resnet(compress_saved=True)
    expands, packed = [], []
    real_unpack, real_packed = sparse_storage.unpack_sparse, sk.conv_grad_weight_packed
    monkeypatch.setattr(sparse_storage, "unpack_sparse", lambda *a: (expands.append(1), real_unpack(*a))[1])
    monkeypatch.setattr(sk, "conv_grad_weight_packed", lambda *a: (packed.append(a[2]), real_packed(*a))[1])
    seen = {}

    def timer(name, path, fn, reps):
        if path in ("dense", "direct"):
            n0, p0 = len(expands), len(packed)
            fn()
            seen.setdefault((name, path), []).append((len(expands) - n0, len(packed) - p0))
        return {"dense": 2.0, "direct": 1.0}.get(path, 3.0)

    timings = ctl.calibrate_kernels(torch.randn(16, 3, 16, 16), timer=timer)
    dw = [t for t in timings if t.op == "grad_weight" and t.sparse_ms is not None and not t.note.startswith("as ")]
    assert dw and all(t.format == "direct" and t.sparse for t in dw)
    convs = [t.layer for t in dw if isinstance(ctl.layers[t.layer], nn.Conv2d)]
    assert convs
    for name in convs:  # per layer: dense fwd / dX (no expansion), dense dW (one), direct fwd / dX, direct dW (none)
        assert (1, 0) in seen[(name, "dense")] and (0, 1) in seen[(name, "direct")]

def test_calibration_keeps_dense_kernels_where_they_win():
    _, ctl = _resnet()
    timings = ctl.calibrate_kernels(torch.randn(16, 3, 16, 16), reps=1, margin=1.0)  # margin 1: sparse never wins
    assert timings and not any(t.sparse for t in timings)
    assert all(layer.sparse_ops == sk.NO_SPARSE for layer in ctl.layers.values())
    assert all(t.dense_ms > 0 for t in timings)
    assert any(t.sparse_ms is not None for t in timings)  # tried where workspace and budget allow
    assert all(t.sparse_ms is not None or "workspace" in t.note or "budget" in t.note or t.note.startswith("as ")
               for t in timings)


def test_always_and_never_modes():
    _, ctl = _resnet(sparse_kernels="always")
    assert not ctl.needs_kernel_calibration
    on = [n for n, layer in ctl.layers.items() if layer.sparse_ops == ("csr",) * 3]
    assert on and all(sk.eligible(ctl.layers[n]) is None for n in on)
    _, ctl = _resnet(sparse_kernels="never")
    assert not ctl.needs_kernel_calibration
    _, ctl = _resnet(structure="channel")  # structured convs never use CSR; the (unstructured) classifier may
    assert [isinstance(layer, nn.Linear) for layer in ctl.layers.values() if sk.eligible(layer) is None] == [True]


def test_training_step_on_csr_kernels_equals_dense_kernels():
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    grads = []
    for mode in ("never", "always"):
        model, _ = _resnet(sparse_kernels=mode)
        F.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_failing_sparse_kernel_stays_dense():
    layer = nn.Linear(8, 4)
    model = nn.Sequential(layer)
    ctl = convert_(model, SWATConfig(sparsity=0.5, sparsify_first_layer=True))
    name, swat = next(iter(ctl.layers.items()))

    def broken(*a, **k):
        raise RuntimeError("no CSR kernel for this dtype")

    t = sk._time_op(name, "forward", lambda: torch.ones(2), {"csr": broken}, 1, 0.05, None)
    assert not t.sparse and t.sparse_ms is None and "csr failed" in t.note
    t = sk._time_op(name, "forward", lambda: torch.ones(2), {"coo": lambda: torch.zeros(2)}, 1, 0.05, None)
    assert not t.sparse and "coo result differs" in t.note
    # one format failing does not stop the other from being timed and chosen
    t = sk._time_op(name, "forward", lambda: torch.ones(2), {"csr": broken, "coo": lambda: torch.ones(2)}, 1,
                    0.05, lambda _n, path, _f, _r: 2.0 if path == "dense" else 1.0)
    assert t.sparse and t.format == "coo" and t.choice == "coo" and "csr failed" in t.note


def test_kernel_choice_survives_a_resume():
    _, ctl = _resnet()
    # an injected timer (dense always faster): the choice below cannot depend on how busy the machine is
    ctl.calibrate_kernels(torch.randn(2, 3, 32, 32), reps=1,
                          timer=lambda _n, path, _f, _r: 1.0 if path == "dense" else 2.0)
    name = next(n for n, layer in ctl.layers.items() if sk.eligible(layer) is None)
    ctl.layers[name].sparse_ops = ("csr", None, "coo")  # as if measured faster here
    state = ctl.state_dict()
    _, fresh = _resnet()
    fresh.load_state_dict(state)
    assert not fresh.needs_kernel_calibration
    assert fresh.layers[name].sparse_ops == ("csr", None, "coo")
    assert f"2 of 24 layer-ops (measured): {name} forward csr, {name} grad_weight coo; the rest dense" \
        in fresh.kernel_summary()
    assert [t.as_dict() for t in fresh.kernel_timings] == state["kernels"]["timings"]
    del state["kernels"]  # a checkpoint from before the CSR kernels
    _, old = _resnet()
    old.load_state_dict(state)
    assert old.needs_kernel_calibration


def test_swat_blpa_fused_unit_convs_stay_on_their_fused_kernel():
    from leanprop.blpa.config import BLPAConfig

    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    grads = []
    for mode in ("never", "always"):
        torch.manual_seed(0)
        model = models.create("preact_resnet20", num_classes=10, shortcut="pad")
        ctl = convert_(model, [SWATConfig(sparsity=0.8, sparse_kernels=mode), BLPAConfig(bits=4)])
        fused = [layer for layer in ctl.swat.layers.values() if getattr(layer, "in_fused_unit", False)]
        assert fused and all(sk.eligible(layer) is not None for layer in fused)
        if mode == "always":
            assert any(op for layer in ctl.swat.layers.values() for op in layer.sparse_ops)
        F.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_calibration_under_bf16_autocast_times_in_bf16_and_never_fails():
    """CPU CSR has no bf16 kernel: the calibration notes it and keeps timing the rest, choosing per measurement."""
    _, ctl = _resnet()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        timings = ctl.calibrate_kernels(torch.randn(2, 3, 32, 32), reps=1)
    assert timings and all(t.sparse_ms is not None or t.note for t in timings)
    for t in timings:
        assert t.sparse == (t.sparse_ms is not None and t.sparse_ms < 0.95 * t.dense_ms)


def test_kernels_are_timed_again_when_a_budget_moves():
    """SWAT-M moves per-layer sparsities: a layer more than 0.05 away from its timed sparsity triggers a new timing."""
    _, ctl = _resnet()
    ctl.calibrate_kernels(torch.randn(2, 3, 32, 32), reps=1)
    assert not ctl.needs_kernel_calibration
    name = next(n for n, layer in ctl.layers.items() if sk.eligible(layer) is None)
    ctl.layers[name].sparsity -= 0.04
    assert not ctl.needs_kernel_calibration
    state = ctl.state_dict()
    ctl.layers[name].sparsity -= 0.02
    assert ctl.needs_kernel_calibration
    _, fresh = _resnet()
    fresh.load_state_dict(state)
    assert not fresh.needs_kernel_calibration and fresh.kernel_sparsity == ctl.kernel_sparsity
    ctl.calibrate_kernels(torch.randn(2, 3, 32, 32), reps=1)
    assert not ctl.needs_kernel_calibration
