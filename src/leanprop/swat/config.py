"""SWAT configuration (Raihan & Aamodt, NeurIPS 2020; docs/methods/swat.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DISTRIBUTIONS = ("uniform", "erk", "momentum")
STRUCTURES = (None, "channel", "filter")
ESTIMATORS = ("exact", "sample")
SPARSE_KERNELS = ("auto", "never", "always")
#: preset words: ``<kind><percent>[-p<P>][-packed]``, e.g. ``u90``, ``erk90``, ``filter70-p10``, ``u90-packed``
PRESET_GRAMMAR = "<u|erk|m|channel|filter><percent>[-p<P>][-packed]"
_PRESET = re.compile(r"(u|erk|m|channel|filter)(\d+)(-p\d+)?(-packed)?")
_KINDS = {"u": ("uniform", None), "erk": ("erk", None), "m": ("momentum", None),
          "channel": ("uniform", "channel"), "filter": ("uniform", "filter")}


@dataclass
class SWATConfig:
    """How SWAT sparsifies a model.

    sparsity: target fraction of zeros per layer (U) or overall (ERK, M), 0 <= s < 1.
    distribution: per-layer budgets: "uniform" (SWAT-U), "erk" (SWAT-ERK), "momentum" (SWAT-M).
    structure: None (unstructured weights), "channel" (L1 of each (out,in) kernel) or "filter" (L1 of
        each output filter); activations are always unstructured, as in the paper.
    topk_period: exact Top-K every this many training steps; thresholds are reused in between (§1.3).
    exact_topk_epochs: leading epochs with exact Top-K on every step (the official "warmup").
    sparsify_first_layer / sparsify_last_layer: None follows the official configs: first layer dense for
        uniform and structured, sparse for ERK and M; last layer sparse (§1.4).
    overrides: per-layer sparsity by module name or regular expression (full match), applied last.
    sparse_eval: evaluate with the sparse weights, as the official code does.
    threshold_estimator: "exact" (default) or "sample" (an approximate threshold from a random sample).
    linear_topk_every_step: exact Top-K for linear layers on every step, as the official code does.
    compress_saved: keep what backward needs compressed, for real memory savings: X_s as values +
        a 1-bit mask (or int32 indices), every nn.ReLU swapped for one that keeps a 1-bit mask and every
        nn.MaxPool2d for one that keeps a uint8 window position per output. Gradients are unchanged (exact
        restore); BN inputs stay dense. Either way W_s is kept as the dense Parameter + a 1-bit mask, and
        without compression X_s is X itself (usually the ReLU's saved output) + the threshold.
    structured_compute: "filter" layers (groups=1) compute only the kept filters -- smaller dense convolutions
        for the forward and dX, gather/scatter around them -- instead of convolving with zeroed filters; same
        results up to summation order. False: the masked dense convolution, as the official code.
    dense_grad_period: P >= 1. With P > 1 (an extension beyond the paper), "filter" layers compute the weight
        gradient of the *pruned* filters only every P steps (the kept filters' every step); P = 1 is the
        paper's dense weight gradient.
    sparse_kernels: unstructured layers' kernels. "auto" (default): before the first training step
        the trainer (or ``controller.calibrate_kernels(x)``) times the dense, the CSR and the COO kernel of each op
        of each layer at its real shapes, and a layer uses the faster sparse one only for the ops where it beat
        dense; until then, and where it loses, the dense kernels. "never": dense kernels, no calibration.
        "always": CSR for every op of every eligible layer (groups 1), for experiments. Same results up to
        summation order either way.
    momentum_freeze / momentum_residual_steps: SWAT-M's 0.99 freeze rule and the maximum number of
        redistribution passes (within one budget update) that spread a frozen layer's excess (§1.5).
    """

    sparsity: float = 0.9
    distribution: str = "uniform"
    structure: str | None = None
    topk_period: int = 20
    exact_topk_epochs: int = 0
    sparsify_first_layer: bool | None = None
    sparsify_last_layer: bool | None = None
    overrides: dict[str, float] = field(default_factory=dict)
    sparse_eval: bool = True
    threshold_estimator: str = "exact"
    sample_size: int = 16384
    linear_topk_every_step: bool = True
    compress_saved: bool = False
    structured_compute: bool = True
    dense_grad_period: int = 1
    sparse_kernels: str = "auto"
    momentum_freeze: float = 0.99
    momentum_residual_steps: int = 1000

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"SWAT sparsity must be in [0, 1), got {self.sparsity}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"SWAT distribution {self.distribution!r}: use one of {', '.join(DISTRIBUTIONS)}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"SWAT structure {self.structure!r}: use null, 'channel' or 'filter'")
        if self.topk_period < 1:
            raise ValueError(f"SWAT topk_period must be >= 1 (steps), got {self.topk_period}")
        if self.dense_grad_period < 1:
            raise ValueError(f"SWAT dense_grad_period must be >= 1 (steps), got {self.dense_grad_period}")
        if self.sparse_kernels not in SPARSE_KERNELS:
            raise ValueError(f"SWAT sparse_kernels {self.sparse_kernels!r}: use 'auto', 'never' or 'always'")
        if self.exact_topk_epochs < 0:
            raise ValueError("SWAT exact_topk_epochs must be >= 0")
        if self.threshold_estimator not in ESTIMATORS:
            raise ValueError(f"SWAT threshold_estimator {self.threshold_estimator!r}: use 'exact' or 'sample'")
        for name, s in self.overrides.items():
            if not 0.0 <= float(s) < 1.0:
                raise ValueError(f"SWAT override {name!r}: sparsity must be in [0, 1), got {s}")
        if not 0.0 < self.momentum_freeze <= 1.0:
            raise ValueError("SWAT momentum_freeze must be in (0, 1]")

    @classmethod
    def preset(cls, name: str) -> SWATConfig:
        """A named configuration: ``u90`` (SWAT-U, 90 % sparsity), ``erk90`` (SWAT-ERK), ``m90`` (SWAT-M),
        ``channel50`` / ``filter70`` (structured, uniform), ``-p10`` (``dense_grad_period=10``, filter only),
        ``-packed`` (``compress_saved=True``). Other settings keep their defaults (Raihan & Aamodt 2020, §4)."""
        m = _PRESET.fullmatch(str(name).strip().lower())
        if m is None:
            raise ValueError(f"unknown SWAT preset {name!r}: use {PRESET_GRAMMAR}, e.g. u90, erk90, filter70-p10")
        percent = int(m.group(2))
        if not 0 <= percent < 100:
            raise ValueError(f"SWAT preset {name!r}: the sparsity must be 0-99 %")
        distribution, structure = _KINDS[m.group(1)]
        period = int(m.group(3)[2:]) if m.group(3) else 1
        if period > 1 and structure != "filter":
            raise ValueError(f"SWAT preset {name!r}: -pN (dense_grad_period) applies to filter presets only")
        return cls(sparsity=percent / 100, distribution=distribution, structure=structure,
                   dense_grad_period=max(1, period), compress_saved=m.group(4) is not None)

    @property
    def preset_name(self) -> str:
        """The preset word of this config's distribution, structure, sparsity, period and packing (its other
        settings are not part of the name)."""
        kind = {"channel": "channel", "filter": "filter"}.get(self.structure or "") or \
            {"uniform": "u", "erk": "erk", "momentum": "m"}[self.distribution]
        period = f"-p{self.dense_grad_period}" if self.dense_grad_period > 1 else ""
        return f"{kind}{round(self.sparsity * 100)}{period}" + ("-packed" if self.compress_saved else "")

    @property
    def first_layer_sparse(self) -> bool:
        if self.sparsify_first_layer is not None:
            return self.sparsify_first_layer
        return self.distribution in ("erk", "momentum") and self.structure is None

    @property
    def last_layer_sparse(self) -> bool:
        return True if self.sparsify_last_layer is None else self.sparsify_last_layer
