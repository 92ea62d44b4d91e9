"""SWAT plugged in as a method (:mod:`leanprop.methods`): spec words ``swat``, ``swat-u90``, ``swat-erk90-packed``...

Converting swaps every selected ``nn.Conv2d`` / ``nn.Linear`` for a SWAT layer holding the same Parameters, with
its budget from the configured distribution (Raihan & Aamodt 2020, §3; docs/methods/swat.md). What backward
keeps: with ``compress_saved`` the layers pack ``X_s`` and every plain ReLU / MaxPool keeps a mask / window index
(:mod:`leanprop.ops.saving_layers`); else every ReLU stays eager under ``torch.compile`` so that compiled SWAT
keeps what eager SWAT keeps. Next to a method that compresses saved activations (BLPA), SWAT keeps X as it is and
leaves it to that method's storage policy (docs/methods/swat_blpa.md).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from leanprop.methods import FilterFn, Method, method_for
from leanprop.ops.kernels import load_kernels
from leanprop.ops.saving_layers import keep_activations_eager_, keep_masks_
from leanprop.swat.budget import assign_budget, collect_layers, uncovered_layers
from leanprop.swat.config import PRESET_GRAMMAR, SWATConfig
from leanprop.swat.controller import SWATController
from leanprop.swat.layers import SWAT_LAYERS, SWATConv2d, SWATLinear, to_dense
from leanprop.utils import set_submodule

__all__ = ["METHOD"]


def _convert(model: nn.Module, cfg: SWATConfig, filter_fn: FilterFn | None, others: Sequence[Any]
             ) -> SWATController:
    if any(method_for(o).compresses_saved for o in others):
        # X kept as it is: the other method's storage policy stores it once for every op that keeps it -- often as
        # nothing but a recipe from a BN's codes (ops.bn_units) -- and SWAT's backward applies the threshold to it
        cfg = dataclasses.replace(cfg, compress_saved=False)
    modules = dict(model.named_modules())
    specs = [s for s in collect_layers(model) if filter_fn is None or filter_fn(s.name, modules[s.name])]
    if not specs:
        raise ValueError("convert_: no nn.Conv2d or nn.Linear layer to convert "
                         "(the model has none, or filter_fn rejected them all)")
    left = uncovered_layers(model)
    if left:
        shown = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
        warnings.warn(f"SWAT covers nn.Conv2d and nn.Linear; left dense: {shown}", stacklevel=3)
    budget = assign_budget(specs, cfg)
    layers: dict[str, nn.Module] = {}
    for spec in specs:
        old = modules[spec.name]
        cls = SWATConv2d if isinstance(old, nn.Conv2d) else SWATLinear
        new = cls.from_dense(old, budget[spec.name], cfg)
        set_submodule(model, spec.name, new)
        layers[spec.name] = new
    if cfg.compress_saved:
        keep_masks_(model, load_kernels(required=False))
    else:  # X is the ReLU's saved output: keep it so under torch.compile too
        keep_activations_eager_(model, (nn.ReLU,))
    return SWATController(model, layers, cfg, budget)


def _revert(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, SWAT_LAYERS):
            set_submodule(model, name, to_dense(module))


def _parse(word: str) -> SWATConfig | None:
    if word == "swat":
        return SWATConfig()
    if not word.startswith("swat-"):
        return None
    return SWATConfig.preset(word[len("swat-"):])


METHOD = Method(
    name="swat", config_type=SWATConfig, order=10, convert=_convert, revert=_revert,
    is_converted=lambda model: any(isinstance(m, SWAT_LAYERS) for m in model.modules()),
    parse=_parse, spec_of=lambda cfg: f"swat-{cfg.preset_name}", grammar=f"swat[-{PRESET_GRAMMAR}]",
)
