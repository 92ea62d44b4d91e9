"""Counted training and inference FLOPs (:mod:`leanprop.ops.flops`, where the methods' controllers count theirs
too), and the nominal SWAT densities of a config for counting a model before converting it."""

from __future__ import annotations

from torch import nn

from leanprop.ops.flops import REMAINDER_CATEGORIES, FlopReport, LayerFlops, count_flops
from leanprop.swat.budget import assign_budget, collect_layers
from leanprop.swat.config import SWATConfig

__all__ = ["LayerFlops", "FlopReport", "count_flops", "swat_densities", "REMAINDER_CATEGORIES"]


def swat_densities(model: nn.Module, cfg: SWATConfig) -> dict[str, tuple[float, float]]:
    """Nominal ``{layer: (d_w, d_a)}`` of a dense model under ``cfg``, without converting it.

    ``d_w = d_a = 1 − s_l`` with ``s_l`` from :func:`leanprop.swat.budget.assign_budget`: in SWAT the
    activation sparsity of a layer equals its weight sparsity (docs/methods/swat.md, 'Distributions').
    For SWAT-M this is the starting (uniform) budget.
    """
    budget = assign_budget(collect_layers(model), cfg)
    return {name: (1.0 - s, 1.0 - s) for name, s in budget.items()}
