"""Per-layer sparsity budgets for SWAT (Raihan & Aamodt, NeurIPS 2020; docs/methods/swat.md).

A *budget* maps each conv/linear module name to its target sparsity ``s_l`` (fraction of zeros).
Three distributions exist:

* ``"uniform"`` (SWAT-U, the official ``constant`` mode): every sparsified layer gets ``cfg.sparsity``.
* ``"erk"`` (SWAT-ERK, RigL's Erdős–Rényi-Kernel): ``s_l = 1 - ε·p_l`` with ``p_l = Σshape/Πshape``.
* ``"momentum"`` (SWAT-M): starts as uniform; :class:`leanprop.swat.momentum.MomentumRedistributor`
  moves the budget during training.

First/last layer (§1.4).  When ``cfg.first_layer_sparse`` (``cfg.last_layer_sparse``) is False the
first (last) layer gets ``s = 0``.  For ERK such a layer is also *outside the budget*: the official
code initialises its zero count to 0, so once it sits in the dense set ``D`` it adds nothing to the
ERK right-hand side (``rhs -= n_zeros = 0``), i.e. the other layers share ``d·N`` of *their own*
parameters and the flagged layer is dense on top.  We put such a layer in ``D`` from the start, which
gives exactly that.  The official code instead lets the flagged layer enter the ERK iteration as an
ordinary layer contributing ``n_ones = N_layer`` to the right-hand side; when its score is high enough to
join ``D`` (VGG-16, WRN-16-8, CIFAR ResNet-18 at 80–95 %, and DenseNet-121 at 80 %) the result is
identical to ours, but when it is not (DenseNet-121 at 90/95 %, ResNet-50) the official code gives the
"dense" layer an ERK sparsity, silently ignoring the flag.  No shipped ERK config turns a flag off (all use
first = last = True), so this only matters for new configurations; we honour the flag.  See
:func:`budget_layers`.

Overrides (``cfg.overrides``, module name or regular expression, ``re.fullmatch``) are applied last and
change the total: the ERK solve still includes the overridden layers, then their value is replaced.  (RigL
instead leaves its ``custom_sparsity_map`` layers out of the solve; the SWAT code has that branch commented out.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn
from torch.nn.utils import parametrize

from .config import SWATConfig

__all__ = [
    "LayerSpec",
    "collect_layers",
    "uncovered_layers",
    "assign_budget",
    "budget_layers",
    "erk_raw_score",
    "erk_sparsities",
    "uniform_sparsities",
    "apply_overrides",
    "override_matches",
    "budget_nonzeros",
]


@dataclass(frozen=True)
class LayerSpec:
    """One sparsifiable layer: module name, ``"conv"`` or ``"linear"``, and its weight shape."""

    name: str
    kind: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of weight entries ``n_l``."""
        return math.prod(self.shape)


#: modules whose forward reads their children's weights without calling them (``nn.MultiheadAttention`` passes
#: ``out_proj.weight`` to ``F.multi_head_attention_forward``): a SWAT layer there would never run
_READ_DIRECTLY = (nn.MultiheadAttention,)
#: weighted layers SWAT leaves dense (:func:`uncovered_layers`)
_UNCOVERED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear)


def uncovered_layers(model: nn.Module) -> list[str]:
    """``"name (Type)"`` of every weighted layer :func:`collect_layers` leaves out: 1-D / 3-D and transposed
    convolutions, bilinear layers, the linear layers of ``nn.MultiheadAttention`` (which never calls them), and
    conv / linear layers whose weight is computed (weight or spectral normalisation)."""
    return [f"{name} ({why})" for name, why in _left_out(model).items()]


def _left_out(model: nn.Module) -> dict[str, str]:
    """``{name: why}`` of the weighted layers SWAT does not convert (:func:`uncovered_layers`)."""
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, _READ_DIRECTLY))
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _UNCOVERED):
            out[name] = type(m).__name__
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            if inside and name.startswith(inside):
                out[name] = "read directly by its MultiheadAttention"
            elif parametrize.is_parametrized(m, "weight") or not isinstance(m._parameters.get("weight"), nn.Parameter):
                # weight_norm / spectral_norm: SWAT's top-K would have to act on what computes the weight
                out[name] = f"{type(m).__name__} whose weight is computed: weight_norm, spectral_norm..."
    return out


def collect_layers(model: nn.Module) -> list[LayerSpec]:
    """Every ``nn.Conv2d`` and ``nn.Linear`` (subclasses included) in ``named_modules()`` order (§1.4), except
    those inside ``nn.MultiheadAttention``, whose forward reads their weights without calling them, and those whose
    weight is computed (:func:`uncovered_layers`).

    Registration order is the budget index order of the official code (dynamic_sparsity.py:56-66):
    index 0 is the first layer, the last entry the classifier for the model zoo's networks.
    """
    layers = []
    left_out = _left_out(model)
    for name, module in model.named_modules():
        if name in left_out:
            continue
        if isinstance(module, nn.Conv2d):
            layers.append(LayerSpec(name, "conv", tuple(module.weight.shape)))
        elif isinstance(module, nn.Linear):
            layers.append(LayerSpec(name, "linear", tuple(module.weight.shape)))
    return layers


def budget_layers(layers: list[LayerSpec], cfg: SWATConfig) -> tuple[list[LayerSpec], set[str]]:
    """Split ``layers`` into those the budget covers and those kept dense by the first/last flags (§1.4).

    Returns ``(covered, forced_dense)``.  A single-layer model with either flag off is all dense.
    """
    forced: set[str] = set()
    if layers and not cfg.first_layer_sparse:
        forced.add(layers[0].name)
    if layers and not cfg.last_layer_sparse:
        forced.add(layers[-1].name)
    return [lay for lay in layers if lay.name not in forced], forced


def uniform_sparsities(layers: list[LayerSpec], cfg: SWATConfig) -> dict[str, float]:
    """SWAT-U / the ``constant`` init (§1.5): ``cfg.sparsity`` everywhere but the flagged layers."""
    _, forced = budget_layers(layers, cfg)
    return {lay.name: (0.0 if lay.name in forced else float(cfg.sparsity)) for lay in layers}


def erk_raw_score(shape: Iterable[int]) -> float:
    """RigL's Erdős–Rényi-Kernel score ``p_l = Σ(shape) / Π(shape)`` (§1.5)."""
    shape = tuple(shape)
    return sum(shape) / math.prod(shape)


def erk_sparsities(layers: list[LayerSpec], density: float, dense: Iterable[str] = ()) -> dict[str, float]:
    """ERK over ``layers`` at overall ``density`` d, with the dense-set iteration (§1.5).

    ``ε = (Σ_{l∉D} d·n_l − Σ_{l∈D} (1−d)·n_l) / Σ_{l∉D} p_l·n_l``; while ``max_{l∉D} ε·p_l > 1`` every layer
    whose ``p_l`` equals that maximum joins ``D`` and ε is recomputed.  ``s_l = 1 − ε·p_l``, 0 in ``D``.
    ``dense`` seeds ``D`` (layers outside the budget should not be passed here at all).  Then
    ``Σ_l (1 − s_l)·n_l = d·Σ_l n_l`` up to floating-point rounding.
    """
    scores = {lay.name: erk_raw_score(lay.shape) for lay in layers}
    in_dense = set(dense)
    while True:
        free = [lay for lay in layers if lay.name not in in_dense]
        if not free:  # everything is dense: only possible for d == 1 or degenerate inputs
            return {lay.name: 0.0 for lay in layers}
        rhs = sum(density * lay.numel for lay in free)
        rhs -= sum((1.0 - density) * lay.numel for lay in layers if lay.name in in_dense)
        divisor = sum(scores[lay.name] * lay.numel for lay in free)
        eps = rhs / divisor
        top = max(scores[lay.name] for lay in free)
        if eps * top <= 1.0:
            break
        in_dense.update(lay.name for lay in free if scores[lay.name] == top)
    return {lay.name: (0.0 if lay.name in in_dense else 1.0 - eps * scores[lay.name]) for lay in layers}


def override_matches(names: Iterable[str], overrides: Mapping[str, float]) -> dict[str, float]:
    """``{layer name: override value}`` for ``cfg.overrides``: a key matches a layer if it equals the name or
    ``re.fullmatch``-es it; later keys win.  A key that matches no layer raises ``ValueError`` (a typo would
    otherwise be silently ignored)."""
    names = list(names)
    out: dict[str, float] = {}
    for key, value in overrides.items():
        try:
            pattern = re.compile(key)
        except re.error:
            pattern = None
        hits = [n for n in names if n == key or (pattern is not None and pattern.fullmatch(n))]
        if not hits:
            raise ValueError(f"SWAT override {key!r} matches no conv/linear layer; layers are: {', '.join(names)}")
        out.update(dict.fromkeys(hits, float(value)))
    return out


def apply_overrides(budget: dict[str, float], overrides: Mapping[str, float]) -> dict[str, float]:
    """``budget`` with the :func:`override_matches` values set (applied last; docs/configuration.md,
    ``swat.overrides``)."""
    return {**budget, **override_matches(budget, overrides)}


def assign_budget(layers: list[LayerSpec], cfg: SWATConfig) -> dict[str, float]:
    """Per-layer sparsity ``{module name: s_l}`` for ``cfg.distribution`` (§1.4, §1.5), overrides last.

    ``"momentum"`` returns its starting point, the uniform (``constant``) budget.  All values are in [0, 1).
    """
    if cfg.distribution in ("uniform", "momentum"):
        budget = uniform_sparsities(layers, cfg)
    elif cfg.distribution == "erk":
        covered, forced = budget_layers(layers, cfg)
        erk = erk_sparsities(covered, 1.0 - cfg.sparsity)
        budget = {lay.name: (0.0 if lay.name in forced else erk[lay.name]) for lay in layers}
    else:  # SWATConfig validates this already
        raise ValueError(f"unknown SWAT distribution {cfg.distribution!r}")
    budget = apply_overrides(budget, cfg.overrides)
    return {name: min(max(s, 0.0), math.nextafter(1.0, 0.0)) for name, s in budget.items()}


def budget_nonzeros(layers: list[LayerSpec], budget: Mapping[str, float]) -> float:
    """``Σ_l (1 − s_l)·n_l`` — the real-valued number of kept weights of a budget."""
    return sum((1.0 - budget[lay.name]) * lay.numel for lay in layers)
