"""BLPA under torch.compile and autocast (docs/methods/blpa.md, "Execution modes").

The method's own ops (fused units, MaskReLU, IndexMaxPool2d) run eagerly inside compiled graphs, and the saved-tensor
codec codes what each compiled region keeps exactly as it codes eager ops' tensors, so a compiled step gives the eager
step's gradients and keeps the same bytes. Under autocast the codec never codes a parameter or a cast of one.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanprop
from leanprop import models
from leanprop.accounting.memory import saved_bytes
from leanprop.modes import CompileStats
from leanprop.ops.codec import SavedTensorCodec, _Packed, find_codec


def _create(name: str) -> nn.Module:
    torch.manual_seed(0)
    return models.create(name, num_classes=10, **({"shortcut": "pad"} if name.startswith("preact") else {}))


def _convert(model: nn.Module, method: str, **blpa) -> object:
    cfg = leanprop.BLPAConfig(bits=4, **blpa)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # post-activation nets: "only the codec applies"
        return leanprop.convert_(model, [leanprop.SWATConfig(sparsity=0.9), cfg] if method == "swat+blpa" else cfg)


def _amp(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype=None, params_of: nn.Module | None = None):
    """Loss and parameter gradients of one training step (``params_of``: the module owning the parameters)."""
    model.train()
    model.zero_grad(set_to_none=True)
    with _amp(dtype):
        loss = nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in (params_of or model).named_parameters()}


def _rel_l2(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in b)
    den = sum((b[k].double() ** 2).sum() for k in b)
    return float((num / den).sqrt())


def _parameter_copy(t: torch.Tensor, params: list[torch.Tensor]) -> str | None:
    """Which parameter ``t`` holds (itself, its autocast cast or any other copy of its values), if any."""
    for p in params:
        if t.data_ptr() == p.data_ptr():
            return "parameter"
        for ref in (p, p.t()) if p.dim() == 2 else (p,):
            if ref.shape == t.shape and torch.equal(ref.detach().to(t.dtype), t.detach()):
                return f"copy ({t.dtype}) of a {tuple(p.shape)} parameter"
    return None


# ------------------------------------------------------------------------------------------ autocast: weights
@pytest.mark.parametrize("name,method", [("preact_resnet20", "blpa"), ("resnet20", "blpa"),
                                         ("resnet20", "swat+blpa"), ("preact_resnet20", "swat+blpa")])
def test_bf16_codec_never_codes_a_parameter_or_its_cast(name, method):
    """bf16 autocast casts every conv weight to a plain bf16 tensor; the 64x64x3x3 ones (73,728 bytes) are above
    the codec's 65,536-byte threshold and were coded as activations (five on preact_resnet20 and on resnet20)."""
    model = _create(name)
    _convert(model, method)
    codec = find_codec(model)
    params = list(model.parameters())
    coded = []
    pack = codec.pack

    def spy(t):
        out = pack(t)
        if isinstance(out, _Packed):
            what = _parameter_copy(t, params)
            if what is not None:
                coded.append(what)
        return out

    codec.pack = spy
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    _, grads = _step(model, x, y, torch.bfloat16)
    assert coded == [], f"{len(coded)} parameters or parameter casts were coded: {coded}"
    assert codec.stats["coded"] + codec.stats["shape_only"] > 0  # activations still are coded (or need no bytes)
    if name == "resnet20" and method == "blpa":  # its conv layers save their bf16 weight casts: referenced instead
        assert codec.stats["param_copies"] >= 5, codec.stats
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_parameter_reference_refuses_an_in_place_update_before_backward():
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
    codec = SavedTensorCodec(bits=8, min_bytes=1024)
    codec.attach(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 8, 8)).float().sum()
    assert codec.stats["param_copies"] >= 1
    with torch.no_grad():
        model[2].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place before backward"):
        out.backward()


def test_codec_codes_a_tensor_the_same_in_any_layout_and_restores_its_strides():
    """A channels-last copy (what Inductor may keep where eager keeps the NCHW tensor) gets the same codes."""
    codec = SavedTensorCodec(bits=8, min_bytes=0)
    a = torch.randn(4, 16, 6, 6)
    nhwc = a.contiguous(memory_format=torch.channels_last)
    pa, pb = codec.pack(a), codec.pack(nhwc)
    assert torch.equal(pa.codes, pb.codes) and torch.equal(pa.lo, pb.lo)
    ua, ub = codec.unpack(pa), codec.unpack(pb)
    assert ua.stride() == a.stride() and ub.stride() == nhwc.stride() and torch.equal(ua, ub)
    assert (ua - a).abs().max() <= (a.amax() - a.amin()) / 255
    t = torch.randn(300, 40).t()  # a transposed 2-D view
    assert codec.unpack(codec.pack(t)).stride() == t.stride()
    expanded = torch.randn(3, 1, 500).expand(3, 4, 500)
    assert codec.pack(expanded) is expanded  # overlapping elements: kept as it is


# ------------------------------------------------------------------------------------------ torch.compile
def _tiny() -> nn.Module:
    """Every BLPA layer kind: a fused unit (BN->ReLU->conv), a half unit (BN->ReLU->pool), IndexMaxPool2d, a ReLU
    after a conv without BN (its mask kept by the codec), and codec-covered conv/linear inputs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def test_compiled_step_equals_eager_on_every_blpa_layer():
    """With the C kernels where a compiler works (the torch-op kernels take the same eager path)."""
    torch._dynamo.reset()
    eager = _tiny()
    ctl = _convert(eager, "blpa", codec_min_bytes=4096)
    assert len(ctl.units) == 2
    compiled = copy.deepcopy(eager)
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4)
    loss_e, grads_e = _step(eager, x, y)
    stats_e = dict(find_codec(eager).stats)
    cmodel = torch.compile(compiled)
    with CompileStats() as cs, torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        loss_c, grads_c = _step(cmodel, x, y, params_of=compiled)
        loss_c2, _ = _step(cmodel, x, y, params_of=compiled)  # a second step reuses the graphs
    assert cs.graphs >= 1 and cs.graph_breaks >= 3, cs.as_dict()  # unit, half unit, pool run eagerly
    assert cs.recompile_limit_hits == 0
    stats_c = find_codec(compiled).stats  # the codec coded the same tensors; what it kept as they are may be a
    for key in ("coded", "masks", "shape_only", "indices"):  # parameter in one and a copy of it in the other
        assert stats_c[key] == stats_e[key], (stats_c, stats_e)
    assert stats_c["kept"] + stats_c["param_copies"] == stats_e["kept"] + stats_e["param_copies"]
    assert abs(loss_c - loss_e) < 1e-5
    # the last conv's input (a ReLU output) is saved by a compiled graph, whose codes keep its zeros exact where
    # eager's (which keep the ReLU's mask on its own) round values below half a step to zero: measured 7.9e-3
    assert _rel_l2(grads_c, grads_e) < 2e-2
    kept_e, kept_c = saved_bytes(eager, x).total_bytes, saved_bytes(cmodel, x).total_bytes
    assert abs(kept_c / kept_e - 1) <= 0.02, (kept_e, kept_c)


@pytest.mark.slow
@pytest.mark.parametrize("name,method,dtype", [("resnet8", "blpa", None), ("preact_resnet8", "blpa", None),
                                               ("resnet8", "blpa", torch.bfloat16),
                                               ("resnet8", "swat+blpa", torch.bfloat16)],
                         ids=["resnet8-blpa-fp32", "preact_resnet8-blpa-fp32", "resnet8-blpa-bf16",
                              "resnet8-swat+blpa-bf16"])
def test_compiled_resnet_step_matches_eager(name, method, dtype):
    """resnet8 (post-activation: codec only) and preact_resnet8 (fused units), BLPA-4 and SWAT-U90 + BLPA-4 (the
    mode matrix, tests/test_modes.py, runs every method on preact_resnet8): fp32 gradients within the issue's 2e-2 of
    eager (measured 5e-7 to 5e-5), kept bytes within 2 % (measured equal). bf16: Inductor keeps fp32 intermediates
    where eager rounds to bf16 op by op, moving even dense gradients by 5 % here, so these run with its
    ``emulate_precision_casts``; conv+BN compiled in bf16 still differ (dense: 2.3 %), hence the bound of dense's own
    compiled-vs-eager distance + 2e-2 (BLPA-4 measured at dense's distance, SWAT+BLPA 3.3e-3)."""
    torch._dynamo.reset()
    plain = _create(name)
    eager = copy.deepcopy(plain)
    _convert(eager, method)
    compiled = copy.deepcopy(eager)
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    _, grads_e = _step(eager, x, y, dtype)
    cmodel = torch.compile(compiled)
    emulate = torch._inductor.config.patch(emulate_precision_casts=dtype is not None)
    with CompileStats() as cs, torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), emulate:
        _, grads_c = _step(cmodel, x, y, dtype, params_of=compiled)
        bound = 2e-2
        if method == "blpa" and dtype is not None:
            dense_e, dense_c = copy.deepcopy(plain), copy.deepcopy(plain)
            _, ge = _step(dense_e, x, y, dtype)
            _, gc = _step(torch.compile(dense_c), x, y, dtype, params_of=dense_c)
            bound += _rel_l2(gc, ge)
    assert cs.recompile_limit_hits == 0, cs.as_dict()
    if name == "resnet8":
        # post-activation: eager rebuilds every ReLU(BN) and ReLU(BN + identity) output from the BN codes (virtual
        # units); compiled, each ReLU runs eagerly between graphs and keeps its 1-bit mask, but the graphs save the
        # BN inputs and the ReLU outputs, which the codec, no longer seeing the ops, codes as they are: two 4-bit
        # approximations of the same step, measured 0.034-0.035 apart for BLPA-4 (0.12 when the ReLUs were traced
        # and read their masks off those codes) and 0.103 for SWAT-U90 + BLPA-4; kept bytes 1.55-1.60x
        bound = 0.06 if method == "blpa" else 0.15
    dist = _rel_l2(grads_c, grads_e)
    assert dist <= bound, (dist, bound)
    with _amp(dtype):
        kept_e, kept_c = saved_bytes(eager, x).total_bytes, saved_bytes(cmodel, x).total_bytes
    # the compiled graph saves the shortcuts' pooling inputs, which eager keeps as shapes only (see test_modes), and
    # codes what eager rebuilds from BN codes (resnet8)
    upper = 1.36 if name.startswith("preact") else 1.65
    assert 0.98 <= kept_c / kept_e <= upper, (kept_e, kept_c)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "bound"), [("FunctionalReLUNet", 0.06), ("MobileNetStyle", 0.06),
                                             ("EfficientNetStyle", 0.10), ("PreActStyle", 0.08),
                                             ("FunctionalClampNet", 0.04)])
def test_compiled_user_model_step_is_close_to_exact(name, bound):
    """Models written the way users write them (``F.relu`` in a forward, ReLU6 + depthwise, SiLU + squeeze-excite,
    pre-activation blocks with ``F.relu``, functional ``F.relu6`` / ``F.hardtanh`` / ``F.leaky_relu``), compiled:
    BLPA-4's gradient stays within ``bound`` relative L2 of plain PyTorch's (measured 0.034, 0.027, 0.068, 0.049,
    0.020). The ReLU-family modules, and the functional ReLU-family calls the codec meets inside a graph, run eagerly
    between the graphs and keep exact 1-bit masks, and a ReLU output a graph saves keeps its zeros. Before: the
    traced ReLU6 modules read their masks off 4-bit codes (0.148 from exact); traced functional calls took their
    masks from what the graph saved (FunctionalReLUNet 0.117, FunctionalClampNet 0.064); the EfficientNet-style
    model did not compile at all (an internal Dynamo error in the codec's BN bookkeeping)."""
    from .user_models import USER_MODELS, example_batch

    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = USER_MODELS[name]() if name in USER_MODELS else _functional_clamp_net()
    for m in plain.modules():  # a compiled dropout draws from another generator than eager's
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model = copy.deepcopy(plain)
    _convert(model, "blpa")
    x, y = example_batch(8)
    _, grads_exact = _step(plain, x, y)
    _, grads_c = _step(torch.compile(model), x, y, params_of=model)
    assert _rel_l2(grads_c, grads_exact) <= bound


def _functional_clamp_net() -> nn.Module:
    """BN -> ``F.relu6``, BN -> ``F.hardtanh(-1, 1)``, conv -> ``F.leaky_relu``: functional ReLU-family calls only."""

    class FunctionalClampNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
            self.c2, self.b2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32)
            self.c3 = nn.Conv2d(32, 32, 3, padding=1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = F.relu6(self.b1(self.c1(x)))
            x = F.hardtanh(self.b2(self.c2(x)), -1.0, 1.0)
            x = F.leaky_relu(self.c3(x), 0.1)
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    return FunctionalClampNet()
