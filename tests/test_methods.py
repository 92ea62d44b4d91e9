"""The method plug-in boundary: the spec grammar, the registry, composition and a third-party method."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import leanprop
from leanprop import models
from leanprop.blpa.config import BLPAConfig
from leanprop.checkpointing import CheckpointConfig
from leanprop.methods import (
    ComposedController,
    Controller,
    Method,
    format_method,
    parse_method,
    register,
    unregister,
)
from leanprop.swat.config import SWATConfig


def test_spec_grammar_parses_every_method_and_reads_back():
    assert parse_method("dense") == [] and format_method([]) == "dense"
    assert parse_method("blpa8") == [BLPAConfig(bits=8)] and parse_method("blpa") == [BLPAConfig()]
    (cfg,) = parse_method("swat-erk95-packed")
    assert cfg.distribution == "erk" and cfg.sparsity == 0.95 and cfg.compress_saved
    (cfg,) = parse_method("SWAT-filter70")
    assert cfg.structure == "filter" and cfg.sparsity == 0.7 and not cfg.compress_saved
    assert parse_method("swat-filter70-p10")[0].dense_grad_period == 10
    assert parse_method("checkpoint") == [CheckpointConfig()]
    swat, blpa = parse_method("blpa4+swat-u90")  # composition order, whatever the spec's order
    assert swat == SWATConfig.preset("u90") and blpa.bits == 4
    for spec in ("swat-u90", "swat-m80", "swat-channel50", "swat-filter70-p10", "swat-u90-packed", "blpa2",
                 "swat-u90+blpa4", "checkpoint"):
        assert format_method(parse_method(spec)) == spec
    for bad, why in [("blpa3", "bits must be one of"), ("sparse", "unknown method"), ("swat-u100", "0-99"),
                     ("swat-x90", "unknown SWAT preset"), ("swat-u90-zip", "unknown SWAT preset"),
                     ("swat-u90+blpa3", "bits"), ("swat-u90-p10", "filter presets only"),
                     ("swat-u90+swat-u80", "twice"), ("swat-u90+", "empty part"), ("blpaa", "Did you mean 'blpa'")]:
        with pytest.raises(ValueError, match=why):
            parse_method(bad)


def test_presets_are_named_constructors():
    assert SWATConfig.preset("u90") == SWATConfig(sparsity=0.9)
    assert SWATConfig.preset("erk80").distribution == "erk" and SWATConfig.preset("m95").distribution == "momentum"
    assert SWATConfig(sparsity=0.9, topk_period=10).preset_name == "u90"
    assert BLPAConfig.preset("2") == BLPAConfig(bits=2)
    with pytest.raises(ValueError, match="unknown BLPA preset"):
        BLPAConfig.preset("3")


def test_dense_and_unknown_configs():
    m = nn.Linear(2, 2)
    ctl = leanprop.convert_(m, [])
    assert type(ctl) is Controller and ctl.name == "dense" and ctl.training_flops(m, (1, 2)) == (1.0, "as dense")
    with pytest.raises(TypeError, match="unsupported method config dict"):
        leanprop.convert_(m, {"sparsity": 0.9})


def test_checkpoint_is_a_method_with_flops_and_revert():
    model = models.create("resnet20")
    keys = list(model.state_dict())
    ctl = leanprop.convert_(model, CheckpointConfig())
    assert ctl.name == "checkpoint" and len(ctl.blocks) == 9
    ratio, how = ctl.training_flops(model, (1, 3, 32, 32))
    assert 1.2 < ratio < 4 / 3 and "one more forward" in how  # the blocks hold nearly all conv MACs
    with pytest.raises(ValueError, match=r"already converted \(checkpoint\)"):
        leanprop.convert_(model, CheckpointConfig())
    leanprop.revert_(model)
    assert list(model.state_dict()) == keys and not any("forward" in m.__dict__ for m in model.modules())


def test_composed_controller_forwards_to_every_part():
    model = models.create("preact_resnet8", num_classes=10, shortcut="pad")
    ctl = leanprop.convert_(model, parse_method("swat-u90+blpa4"))
    assert isinstance(ctl, ComposedController) and ctl.name == "swat+blpa"
    assert ctl.swat is ctl.parts[0] and ctl.blpa is ctl.parts[1]
    assert set(ctl.state_dict()) == {"swat", "blpa"} and "weight_sparsity" in ctl.metrics()
    ratio, how = ctl.training_flops(model, (1, 3, 32, 32))
    assert ratio == ctl.swat.training_flops(model, (1, 3, 32, 32))[0] < 0.5 and "SWAT budgets" in how


@dataclass
class _ScaleConfig:
    """A third-party method: scales every Linear's output in training."""

    factor: float = 2.0


class _ScaleController(Controller):
    name = "scale"

    def __init__(self, layers):
        self.layers, self.steps = layers, 0

    def step(self):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}


def test_a_third_party_method_plugs_in_and_composes():
    def convert(model, cfg, filter_fn, others):
        handles = [m.register_forward_hook(lambda _m, _i, out: out * cfg.factor)
                   for m in model.modules() if isinstance(m, nn.Linear)]
        model._scale_handles = handles
        return _ScaleController(handles)

    def revert(model):
        for h in model.__dict__.pop("_scale_handles", []):
            h.remove()

    register(Method(name="scale", config_type=_ScaleConfig, order=40, convert=convert, revert=revert,
                    is_converted=lambda model: "_scale_handles" in model.__dict__,
                    parse=lambda w: _ScaleConfig() if w == "scale" else None, spec_of=lambda c: "scale",
                    grammar="scale"))
    try:
        _use_scale()
    finally:
        unregister(_ScaleConfig)
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("scale")


def _use_scale():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    plain = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    ctl = leanprop.convert_(model, parse_method("scale+swat-u0"))
    assert [p.name for p in ctl.parts] == ["swat", "scale"]
    torch.testing.assert_close(model(x), 2 * plain(x))
    ctl.step()
    assert ctl.state_dict()["scale"] == {"steps": 1}
    leanprop.revert_(model)
    torch.testing.assert_close(model(x), plain(x))
    assert format_method(parse_method("swat-u0+scale")) == "swat-u0+scale"
