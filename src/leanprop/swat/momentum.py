"""SWAT-M: momentum-driven per-layer sparsity redistribution (Raihan & Aamodt, NeurIPS 2020).

Every training step, after ``optimizer.step()``:

1. ``m_l`` = mean |momentum| over the *surviving* (currently kept) weights of layer ``l``
   (:func:`mean_abs_momentum`; SGD ``momentum_buffer`` or Adam ``exp_avg / (sqrt(exp_avg_sq) + 1e-8)``);
2. ``m_l /= Σ m``;  target non-zeros ``nz_l = ceil(m_l · d · N_total)``;
3. the SNFS-style freeze/redistribution loop below;
4. ``s_l = 1 − nz_l / n_l``.

Redistribution loop (what :meth:`MomentumRedistributor.update` implements; it reproduces the official
``sparsity_regrowth``; tests/test_swat_budget.py checks it).  ``a_l`` is the running allocation,
``r`` the excess, ``μ`` the mean residual (0 at first), ``T = d·N_total`` the target, ``F`` = ``cfg.momentum_freeze``:

* repeat at most ``cfg.momentum_residual_steps`` times, while the previous pass left ``r > 0`` and did not
  already allocate more than ``T`` in total:

  - for every layer, ``g = a_l + μ`` (first pass: ``g = ceil(m_l·d·N_total)``);
    if ``g > F·n_l`` the layer is frozen *dense* (``a_l = n_l``) and ``g − n_l`` is added to ``r``;
    otherwise ``a_l = g``;
  - if ``r`` exceeds the number of layers ``L``, ``μ = ceil(r / L)`` for the next pass; otherwise the left-over
    ``r ≤ L`` is dropped and the loop ends.

  Frozen layers also receive ``μ`` and hand it straight back, so each pass gives ``μ`` to every unfrozen layer
  and the excess shrinks geometrically (by the frozen fraction); in total the unfrozen layers absorb the
  excess evenly, up to ceil rounding.  ``Σ nz_l`` therefore equals ``d·N_total`` up to about one weight per
  layer per pass (ceil rounding and the dropped ``r ≤ L``).

The up to ``cfg.momentum_residual_steps`` (1000) redistribution passes all run within *one* training step, as in
the official code;
the next step starts again from fresh momentum statistics, so no residual carries over between steps.  The
state kept across steps (and checkpointed by :meth:`~MomentumRedistributor.state_dict`) is the current budget,
which the zero-momentum fallback reuses, plus counters.

Deviations from the official code, all for degenerate inputs only:

* zero (or non-finite) total momentum — first step, a ``momentum=0`` optimizer, no state yet — keeps the
  previous budget and counts a fallback, instead of exiting ("Total Momentum was zero!");
* a layer whose statistic is ``None`` or NaN (no state, no surviving weight) contributes 0 to ``Σ m``
  instead of a NaN budget;
* every layer keeps at least one non-zero, so ``s_l < 1``.

Which layers take part: every layer of the budget, also the ones the first/last flags kept dense at
initialisation (§1.5: the flags only matter at init).  Layers fixed by ``cfg.overrides`` keep their value and
are left out of ``N_total`` and of the redistribution (an extension; the official code has no overrides).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .budget import LayerSpec, assign_budget, override_matches
from .config import SWATConfig

__all__ = [
    "MomentumRedistributor",
    "mean_abs_momentum",
    "check_optimizer_supports_momentum",
    "redistribute_nonzeros",
    "ADAM_EPS",
]

#: ε in Adam's normalised momentum ``exp_avg / (sqrt(exp_avg_sq) + ε)`` (official value).
ADAM_EPS = 1e-8
_ADAM_LIKE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam)
_FIX = "use torch.optim.SGD with momentum > 0, or torch.optim.Adam / AdamW"


def check_optimizer_supports_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` unless every param group of ``optimizer`` keeps the statistics SWAT-M reads.

    Accepted: any group with ``momentum > 0`` (SGD, RMSprop: ``momentum_buffer``) and the Adam family
    (Adam, AdamW, NAdam, RAdam: ``exp_avg`` and ``exp_avg_sq``).
    """
    for i, group in enumerate(optimizer.param_groups):
        if float(group.get("momentum", 0.0) or 0.0) > 0.0:
            continue
        if isinstance(optimizer, _ADAM_LIKE):
            continue
        raise ValueError(
            f"SWAT-M (distribution='momentum') needs the optimizer's momentum, but {type(optimizer).__name__} "
            f"param group {i} keeps none (momentum={group.get('momentum', 'n/a')}); {_FIX}")


def _momentum_tensor(state: Mapping[str, Any]) -> torch.Tensor | None:
    if "exp_avg" in state and "exp_avg_sq" in state:
        return state["exp_avg"] / (torch.sqrt(state["exp_avg_sq"]) + ADAM_EPS)
    if "momentum_buffer" in state:
        return state["momentum_buffer"]  # None for SGD with momentum=0
    raise ValueError(f"SWAT-M cannot read momentum from optimizer state with keys {sorted(state)}; {_FIX}")


def mean_abs_momentum(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                      mask: torch.Tensor | None = None) -> float | None:
    """Mean |momentum| of ``param`` over the entries where ``mask`` is non-zero (all entries if None).

    SGD/RMSprop: ``momentum_buffer``; Adam family: ``exp_avg / (sqrt(exp_avg_sq) + 1e-8)`` (§1.5).  Returns
    None while the optimizer has no state for ``param`` (before the first step) or keeps no momentum buffer
    (SGD with momentum 0), and 0.0 when the mask keeps nothing.  Unknown state layouts raise ``ValueError``.
    """
    m = mean_abs_momentum_tensor(optimizer, param, mask)
    return None if m is None else float(m)


def mean_abs_momentum_tensor(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                             mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """:func:`mean_abs_momentum` as a 0-d float32 tensor on the parameter's device, computed without a host sync
    (a masked sum over the mask's count, 0 when it keeps nothing), so a controller can read every layer's value
    with one transfer."""
    state = optimizer.state.get(param)
    if not state:
        return None
    mom = _momentum_tensor(state)
    if mom is None:
        return None
    mag = mom.detach().abs().float()
    if mask is None:
        return mag.mean() if mag.numel() else mag.new_zeros(())
    keep = (mask.to(device=mag.device) != 0).expand_as(mag)
    return torch.where(keep, mag, 0.0).sum() / keep.sum().clamp_min(1)


def redistribute_nonzeros(momentum: Mapping[str, float], numel: Mapping[str, int], density: float,
                          total: int, freeze: float = 0.99, max_passes: int = 1000) -> tuple[dict[str, int], int, int]:
    """The freeze/redistribution loop of the module docstring.

    ``momentum`` must already be normalised (sums to 1) and have the same keys, in layer order, as ``numel``.
    Returns ``(nonzeros per layer, passes run, left-over residual)``; nonzeros are at least 1.
    """
    target = density * total
    alloc: dict[str, int] = {}
    mean_residual = 0
    residual = 1  # anything > 0 enters the loop
    allocated = 0
    passes = 0
    while residual > 0 and passes < max_passes:
        if allocated > target:
            break
        residual = 0
        allocated = 0
        for name, n in numel.items():
            grow = alloc[name] if name in alloc else math.ceil(momentum[name] * density * total)
            grow += mean_residual
            if grow > freeze * n:
                alloc[name] = n
                residual += grow - n
            else:
                alloc[name] = grow
            allocated += alloc[name]
        if residual > len(alloc):
            mean_residual = math.ceil(residual / len(alloc))
        else:
            residual = 0
        passes += 1
    return {name: max(int(a), 1) for name, a in alloc.items()}, passes, int(residual)


class MomentumRedistributor:
    """Keeps the SWAT-M budget and updates it from per-layer mean |momentum| (module docstring; docs/methods/swat.md,
    'Distributions').

    >>> redist = MomentumRedistributor(collect_layers(model), cfg)       # uniform start
    >>> check_optimizer_supports_momentum(optimizer)
    >>> # each step, after optimizer.step(), with the masks the forward used:
    >>> budget = redist.update({name: mean_abs_momentum(optimizer, w, mask) for ...})

    The starting budget is :func:`~leanprop.swat.budget.assign_budget` of ``cfg`` (uniform, with the first/last
    flags, for ``distribution="momentum"``).  ``budget`` is ``{layer: s_l}``; ``nonzeros`` the exact counts behind
    it (``s_l = 1 − nonzeros/n_l``), which a layer should prefer to re-deriving ``ceil((1 − s_l)·n_l)`` from the
    float.
    """

    def __init__(self, layers: list[LayerSpec], cfg: SWATConfig):
        self.layers = list(layers)
        self.cfg = cfg
        self._numel = {lay.name: lay.numel for lay in self.layers}
        self.pinned = override_matches(self._numel, cfg.overrides)
        self.free = {n: k for n, k in self._numel.items() if n not in self.pinned}
        self.total = sum(self.free.values())
        self.density = 1.0 - cfg.sparsity
        self._budget = assign_budget(self.layers, cfg)
        self._nonzeros = {n: max(1, math.ceil((1.0 - s) * self._numel[n] - 1e-6)) for n, s in self._budget.items()}
        self.steps = 0
        self.fallbacks = 0
        self.last_passes = 0
        self.last_residual = 0

    @property
    def budget(self) -> dict[str, float]:
        """Current ``{layer: sparsity}``."""
        return dict(self._budget)

    @property
    def nonzeros(self) -> dict[str, int]:
        """Current ``{layer: kept weights}``."""
        return dict(self._nonzeros)

    def _normalised(self, mean_abs_momentum: Mapping[str, float | None]) -> dict[str, float] | None:
        unknown = sorted(set(mean_abs_momentum) - set(self._numel))
        if unknown:
            raise ValueError(f"SWAT-M: momentum given for unknown layers {unknown}")
        vals = {}
        for name in self.free:
            v = mean_abs_momentum.get(name)
            v = 0.0 if v is None or math.isnan(v) else float(v)
            if v < 0.0:
                raise ValueError(f"SWAT-M: mean |momentum| of {name!r} is negative ({v})")
            vals[name] = v
        total = sum(vals.values())
        if not (total > 0.0 and math.isfinite(total)):
            return None
        return {name: v / total for name, v in vals.items()}

    def update(self, mean_abs_momentum: Mapping[str, float | None]) -> dict[str, float]:
        """One SWAT-M step from ``{layer: mean |momentum| of its surviving weights}``; returns the new budget.

        Zero, missing or non-finite total momentum keeps the previous budget (``fallbacks`` counts this).
        """
        m = self._normalised(mean_abs_momentum)
        if m is None:
            self.fallbacks += 1
            return self.budget
        nz, passes, residual = redistribute_nonzeros(
            m, self.free, self.density, self.total, self.cfg.momentum_freeze, self.cfg.momentum_residual_steps)
        for name, k in nz.items():
            self._nonzeros[name] = k
            self._budget[name] = 1.0 - k / self._numel[name]
        self.steps += 1
        self.last_passes, self.last_residual = passes, residual
        return self.budget

    def update_from_optimizer(self, optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor],
                              masks: Mapping[str, torch.Tensor | None] | None = None) -> dict[str, float]:
        """:meth:`update` with statistics read by :func:`mean_abs_momentum` for ``params`` (``{layer: weight}``)."""
        masks = masks or {}
        return self.update({n: mean_abs_momentum(optimizer, p, masks.get(n)) for n, p in params.items()})

    def state_dict(self) -> dict[str, Any]:
        """Budget, exact non-zero counts and counters (everything an update or a fallback depends on)."""
        return {
            "layers": [lay.name for lay in self.layers],
            "budget": dict(self._budget),
            "nonzeros": dict(self._nonzeros),
            "steps": self.steps,
            "fallbacks": self.fallbacks,
            "last_passes": self.last_passes,
            "last_residual": self.last_residual,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the layer names must match this model's."""
        names = [lay.name for lay in self.layers]
        if list(state["layers"]) != names:
            raise ValueError("SWAT-M state was saved for different layers: "
                             f"{list(state['layers'])[:5]}... vs {names[:5]}...")
        self._budget = {n: float(state["budget"][n]) for n in names}
        self._nonzeros = {n: int(state["nonzeros"][n]) for n in names}
        self.steps = int(state["steps"])
        self.fallbacks = int(state["fallbacks"])
        self.last_passes = int(state.get("last_passes", 0))
        self.last_residual = int(state.get("last_residual", 0))
