"""BLPA plugged in as a method (:mod:`leanprop.methods`): spec words ``blpa`` (4 bits) and ``blpa8`` / ``blpa4`` /
``blpa2`` / ``blpa32``.

Converting fuses every BN->ReLU(->Conv) unit (Chakrabarti & Moseley 2019, §3; docs/methods/blpa.md): the BN
becomes the unit's head, the ReLU an identity, the conv a tail whose forward passes the unit's output on. A conv
of another method (:class:`leanprop.ops.fusion.FusableConv`, e.g. SWAT's) stays that method's layer and runs
inside the unit. With ``codec`` (default) every other ReLU / MaxPool module keeps a mask / window index and the
saved-tensor codec stores the rest by the op that keeps it (:mod:`leanprop.ops.codec`: masks, shapes, K-bit codes).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from leanprop.blpa.config import BITS, BLPAConfig
from leanprop.blpa.controller import BLPAController, find_units
from leanprop.blpa.layers import BLPA_LAYERS, BLPABatchNorm2d, make_unit, unmake_unit
from leanprop.methods import FilterFn, Method
from leanprop.ops.codec import SavedTensorCodec, find_codec
from leanprop.ops.kernels import load_kernels
from leanprop.ops.saving_layers import keep_activations_eager_, keep_masks_
from leanprop.utils import set_submodule

__all__ = ["METHOD"]


def _convert(model: nn.Module, cfg: BLPAConfig, filter_fn: FilterFn | None, others: Sequence[Any]
             ) -> BLPAController:
    modules = dict(model.named_modules())
    units = [u for u in find_units(model) if filter_fn is None or filter_fn(u.bn, modules[u.bn])]
    kernels = None
    coded = (cfg.outside_bits or 32) < 32 or (cfg.outside_bits is not None and any(v < 32 for v in cfg.policy.values()))
    if cfg.kernels != "torch" and ((units and cfg.bits != 32) or coded):
        kernels = load_kernels(required=cfg.kernels == "c")
    for u in units:
        head, relu, tail = make_unit(modules[u.bn], modules[u.relu], modules[u.conv] if u.conv else None,
                                     {"cfg": cfg, "kernels": kernels}, u.relu, u.conv)
        set_submodule(model, u.bn, head)
        set_submodule(model, u.relu, relu)
        if tail is not None:
            set_submodule(model, u.conv, tail)
    codec = None
    if cfg.outside_bits is not None:
        # ReLUs stay: the codec keeps their masks and sees a ReLU of a BN output (a virtual unit, ops.bn_units)
        keep_masks_(model, kernels, relus=False)
        keep_activations_eager_(model)  # compiled, they still run under the codec and keep exact masks
        codec = SavedTensorCodec(cfg.outside_bits, cfg.codec_min_bytes, by_op=True, stochastic=cfg.stochastic_rounding,
                                 seed=cfg.seed, policy=cfg.policy, kernels=kernels)
        codec.attach(model)
    return BLPAController(model, units, cfg, codec, str(kernels.path) if kernels is not None else None)


def _revert(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, BLPABatchNorm2d):
            relu_name, conv_name = module.blpa_relu_name, module.blpa_conv_name
            bn, relu, conv = unmake_unit(module)
            set_submodule(model, name, bn)
            set_submodule(model, relu_name, relu)
            if conv is not None:
                set_submodule(model, conv_name, conv)
    codec = find_codec(model)
    if codec is not None:
        codec.detach()


def _parse(word: str) -> BLPAConfig | None:
    m = re.fullmatch(r"blpa(\d*)", word)
    if m is None:
        return None
    if not m.group(1):
        return BLPAConfig()
    if int(m.group(1)) not in BITS:
        raise ValueError(f"BLPA bits must be one of {BITS}")
    return BLPAConfig.preset(m.group(1))


def _is_converted(model: nn.Module) -> bool:
    return any(isinstance(m, BLPA_LAYERS) for m in model.modules()) or find_codec(model) is not None


METHOD = Method(
    name="blpa", config_type=BLPAConfig, order=20, convert=_convert, revert=_revert, is_converted=_is_converted,
    parse=_parse, spec_of=lambda cfg: f"blpa{cfg.bits}", grammar="blpa[8|4|2|32]", compresses_saved=True,
)
