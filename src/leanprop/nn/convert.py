"""``convert_(model, config, filter_fn)`` / ``revert_(model)``: swap layers in place, reusing Parameters.

The swapped layers hold the very Parameter objects of the original ones, so optimizers built before or
after conversion see the same tensors and ``state_dict()`` keys never change: a model trained with a
method loads into the plain architecture. Which layers a config swaps is its method's business
(:mod:`leanprop.methods`: the registry keyed by config type); this module only dispatches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from leanprop.methods import ComposedController, Controller, FilterFn, method_for, registered
from leanprop.ops.saving_layers import revert_saving_layers_

__all__ = ["convert_", "revert_"]


def convert_(model: nn.Module, config: Any, filter_fn: FilterFn | Mapping[str, FilterFn] | None = None
             ) -> Controller:
    """Convert ``model`` in place for ``config`` and return the method's controller (:class:`Controller`).

    ``config``: a method config (``SWATConfig``, ``BLPAConfig``, ``CheckpointConfig`` or a registered
    third-party one), or a list of them for several methods on one model (``[SWATConfig, BLPAConfig]``: SWAT
    convs run inside BLPA's fused units, docs/methods/swat_blpa.md); ``[]`` is plain PyTorch. The list converts
    in registry order whatever its order, into one :class:`ComposedController`.

    ``filter_fn(name, module) -> bool`` restricts what a method converts: SWAT the Conv2d/Linear layers (the first
    and last *converted* layers are the ones the first/last-layer flags refer to), BLPA the BN->ReLU(->Conv) units
    (called with the BN's name), checkpointing the blocks. With a list, a plain function applies to the method
    converted first; ``{"swat": fn, "blpa": fn2}`` gives each method its own.
    """
    configs = list(config) if isinstance(config, (list, tuple)) else [config]
    methods = [method_for(c) for c in configs]
    if len({m.name for m in methods}) != len(methods):
        raise TypeError("convert_: a list of configs may hold one config per method, got "
                        + ", ".join(type(c).__name__ for c in configs))
    for m in registered():
        if m.is_converted(model):
            raise ValueError(f"convert_: the model is already converted ({m.name}); call leanprop.revert_(model) "
                             "first")
    pairs = sorted(zip(methods, configs, strict=True), key=lambda mc: mc[0].order)
    controllers = []
    for i, (m, cfg) in enumerate(pairs):
        fn = filter_fn.get(m.name) if isinstance(filter_fn, Mapping) else (filter_fn if i == 0 else None)
        controllers.append(m.convert(model, cfg, fn, [c for _, c in pairs if c is not cfg]))
    if not controllers:
        return Controller()
    return controllers[0] if len(controllers) == 1 else ComposedController(controllers)


def revert_(model: nn.Module) -> nn.Module:
    """Undo every method's conversion (latest-composed first), restoring the plain PyTorch classes with the same
    Parameters; returns ``model``."""
    for m in reversed(registered()):
        m.revert(model)
    revert_saving_layers_(model)
    return model
