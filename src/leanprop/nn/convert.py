"""``convert_(model, config, filter_fn)`` / ``revert_(model)``: swap layers in place, reusing Parameters.

The swapped layers hold the very Parameter objects of the original ones, so optimizers built before or
after conversion see the same tensors and ``state_dict()`` keys never change: a model trained with a
method loads into the plain architecture.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from leanprop.blpa.codec import find_codec
from leanprop.blpa.config import BLPAConfig
from leanprop.blpa.controller import BLPAController
from leanprop.nn.blpa_layers import (
    BLPA_LAYERS,
    BLPABatchNorm2d,
    IndexMaxPool2d,
    MaskReLU,
    from_index_maxpool,
    from_mask_relu,
    make_unit,
    to_index_maxpool,
    to_mask_relu,
    unmake_unit,
)
from leanprop.nn.combined import CombinedController
from leanprop.nn.swat_layers import (
    SWAT_LAYERS,
    EagerReLU,
    SWATConv2d,
    SWATLinear,
    from_eager_relu,
    to_dense,
    to_eager_relu,
)
from leanprop.swat.budget import assign_budget, collect_layers
from leanprop.swat.config import SWATConfig
from leanprop.swat.controller import SWATController

FilterFn = Callable[[str, nn.Module], bool]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert_(model: nn.Module, config: SWATConfig | BLPAConfig | list | tuple, filter_fn: FilterFn | None = None
             ) -> SWATController | BLPAController | CombinedController:
    """Convert ``model`` in place for ``config`` and return the method's controller.

    SWAT: ``filter_fn(name, module) -> bool`` restricts which Conv2d/Linear layers are converted; the first
    and last of the *converted* layers are the ones the first/last-layer flags refer to.
    BLPA: ``filter_fn(bn_name, bn_module)`` restricts which BN->ReLU(->Conv) units are fused.
    ``[SWATConfig, BLPAConfig]`` (either order): both on one model (:mod:`leanprop.nn.combined`; SWAT's saved
    tensors are always packed, ``compress_saved=True``); ``filter_fn`` then applies to the SWAT layers.
    """
    if isinstance(config, BLPAConfig):
        return _convert_blpa(model, config, filter_fn)
    if isinstance(config, (list, tuple)):
        return _convert_combined(model, list(config), filter_fn)
    return _convert_swat(model, config, filter_fn)


def _convert_combined(model: nn.Module, configs: list, filter_fn: FilterFn | None) -> CombinedController:
    swat = [c for c in configs if isinstance(c, SWATConfig)]
    blpa = [c for c in configs if isinstance(c, BLPAConfig)]
    if len(configs) == 1:
        return convert_(model, configs[0], filter_fn)
    if len(swat) != 1 or len(blpa) != 1 or len(configs) != 2:
        raise TypeError("convert_: a list of configs must be one SWATConfig and one BLPAConfig, got "
                        + ", ".join(type(c).__name__ for c in configs))
    from leanprop.blpa.controller import find_units

    if any(isinstance(m, (*SWAT_LAYERS, *BLPA_LAYERS)) for m in model.modules()) or find_codec(model) is not None:
        raise ValueError("convert_: the model is already converted; call leanprop.revert_(model) first")
    units = find_units(model)  # on the plain model: SWAT layers are not nn.Conv2d for find_units
    swat_ctl = _convert_swat(model, dataclasses.replace(swat[0], compress_saved=True), filter_fn, swap_relus=False)
    # a unit whose conv became a SWAT layer runs it inside the fused Function (SWATFusedConvTail)
    blpa_ctl = _convert_blpa(model, blpa[0], None, units=units)
    if blpa[0].codec_bits is None:  # BLPA's codec path swaps the remaining ReLUs itself
        from leanprop.blpa.kernels import load_kernels

        _relus_keep_masks(model, load_kernels(required=False) if blpa[0].kernels != "torch" else None)
    return CombinedController(swat_ctl, blpa_ctl)


def _convert_swat(model: nn.Module, config: SWATConfig, filter_fn: FilterFn | None, swap_relus: bool = True
                  ) -> SWATController:
    if not isinstance(config, SWATConfig):
        raise TypeError(f"convert_: unsupported config {type(config).__name__}; "
                        "pass a leanprop.SWATConfig or leanprop.BLPAConfig")
    if any(isinstance(m, SWAT_LAYERS) for m in model.modules()):
        raise ValueError("convert_: the model already holds SWAT layers; call leanprop.revert_(model) first")
    modules = dict(model.named_modules())
    specs = [s for s in collect_layers(model) if filter_fn is None or filter_fn(s.name, modules[s.name])]
    if not specs:
        raise ValueError("convert_: no nn.Conv2d or nn.Linear layer to convert "
                         "(the model has none, or filter_fn rejected them all)")
    budget = assign_budget(specs, config)
    layers: dict[str, nn.Module] = {}
    for spec in specs:
        old = modules[spec.name]
        cls = SWATConv2d if isinstance(old, nn.Conv2d) else SWATLinear
        new = cls.from_dense(old, budget[spec.name], config)
        _set_submodule(model, spec.name, new)
        layers[spec.name] = new
    if config.compress_saved and swap_relus:
        from leanprop.blpa.kernels import load_kernels

        _relus_keep_masks(model, load_kernels(required=False))
    elif swap_relus:  # X is the ReLU's saved output: keep it so under torch.compile too (EagerReLU)
        for name, m in list(model.named_modules()):
            if type(m) is nn.ReLU:
                _set_submodule(model, name, to_eager_relu(m))
    return SWATController(model, layers, config, budget)


def _relus_keep_masks(model: nn.Module, kernels) -> None:
    """Every plain ``nn.ReLU`` keeps an exact 1-bit mask for backward instead of its output (``MaskReLU``;
    ``kernels``: the compiled packer, or None for the pure-torch one), and every plain ``nn.MaxPool2d`` one
    uint8 window position per output instead of its input and int64 indices (``IndexMaxPool2d``)."""
    for name, m in list(model.named_modules()):
        if type(m) is nn.ReLU:
            _set_submodule(model, name, to_mask_relu(m, kernels))
        elif type(m) is nn.MaxPool2d:
            _set_submodule(model, name, to_index_maxpool(m))


def _convert_blpa(model: nn.Module, cfg: BLPAConfig, filter_fn: FilterFn | None, units: list | None = None
                  ) -> BLPAController:
    from leanprop.blpa.codec import SavedTensorCodec
    from leanprop.blpa.controller import find_units
    from leanprop.blpa.kernels import load_kernels

    if any(isinstance(m, BLPA_LAYERS) for m in model.modules()) or find_codec(model) is not None:
        raise ValueError("convert_: the model is already BLPA-converted; call leanprop.revert_(model) first")
    modules = dict(model.named_modules())
    units = [u for u in (find_units(model) if units is None else units)
             if filter_fn is None or filter_fn(u.bn, modules[u.bn])]
    kernels = None
    if cfg.kernels != "torch" and units and cfg.bits != 32:
        kernels = load_kernels(required=cfg.kernels == "c")
    for u in units:
        head, relu, tail = make_unit(modules[u.bn], modules[u.relu], modules[u.conv] if u.conv else None,
                                     {"cfg": cfg, "kernels": kernels}, u.relu, u.conv)
        _set_submodule(model, u.bn, head)
        _set_submodule(model, u.relu, relu)
        if tail is not None:
            _set_submodule(model, u.conv, tail)
    codec = None
    if cfg.codec_bits is not None:
        _relus_keep_masks(model, kernels)
        codec = SavedTensorCodec(cfg.codec_bits, cfg.codec_min_bytes)
        codec.attach(model)
    return BLPAController(model, units, cfg, codec, str(kernels.path) if kernels is not None else None)


def revert_(model: nn.Module) -> nn.Module:
    """Swap every method layer back to its plain PyTorch class (same Parameters); returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SWAT_LAYERS):
            _set_submodule(model, name, to_dense(module))
        elif isinstance(module, MaskReLU):
            _set_submodule(model, name, from_mask_relu(module))
        elif isinstance(module, EagerReLU):
            _set_submodule(model, name, from_eager_relu(module))
        elif isinstance(module, IndexMaxPool2d):
            _set_submodule(model, name, from_index_maxpool(module))
        elif isinstance(module, BLPABatchNorm2d):
            relu_name, conv_name = module.blpa_relu_name, module.blpa_conv_name
            bn, relu, conv = unmake_unit(module)
            _set_submodule(model, name, bn)
            _set_submodule(model, relu_name, relu)
            if conv is not None:
                _set_submodule(model, conv_name, conv)
    codec = find_codec(model)
    if codec is not None:
        codec.detach()
    return model



@torch.no_grad()
def hard_prune_(model: nn.Module) -> dict[str, float]:
    """Zero the pruned weights of every SWAT layer for good (exact Top-K at its final budget;
    docs/methods/swat.md, 'How to use').

    Returns the weight sparsity each layer ends with. Use it at the end of training to obtain the sparse
    model; ``revert_`` afterwards gives a plain model whose zeros are the SWAT topology.
    """
    result = {}
    for name, module in model.named_modules():
        if isinstance(module, SWAT_LAYERS):
            module.refresh_weight_threshold()
            mask = module.weight_mask()
            if mask is not None:
                module.weight.mul_(mask)
            result[name] = 1.0 - float(torch.count_nonzero(module.weight)) / module.weight.numel()
    return result
