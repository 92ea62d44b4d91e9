"""Analytic training and inference FLOPs of dense and SWAT models (Raihan & Aamodt, NeurIPS 2020).

The official SWAT code has no FLOP counter; the formulas below were reconstructed by matching the
numbers of its README and poster (docs/methods/swat.md, 'FLOP accounting').  Per conv or linear layer ``l``
with ``M_l`` forward multiply-accumulates (MACs) per sample, weight density ``d_w`` and saved-activation density
``d_a``:

* dense training  ``3·M_l`` (forward, grad-input, grad-weight);
* SWAT training   ``M_l·(d_w + d_w + d_a)``: forward = sparse W × dense X, grad-input = G × sparse W,
  grad-weight = G × sparse X (G is never sparse, §1.1);
* inference       ``M_l·d_w`` (dense: ``M_l``);
* reduction       ``1 − sparse / dense``, summed over conv/linear layers only.  This is the paper's
  convention and the one that reproduces its numbers (``FlopReport.training_reduction`` and
  ``inference_reduction``).

Dense remainder.  BN, activations, pooling, dropout and residual additions are always dense in SWAT.  The
paper ignores them; we count them separately with a deliberately simple per-element convention, in
MAC-equivalents per sample (one elementwise operation = one MAC-equivalent):

====================  ===============================================================
normalisation         2 per output element (normalise, then scale-and-shift)
activation            1 per output element (ReLU and other pointwise non-linearities)
pooling               window size per output element (max/avg); adaptive: 1 per input element
dropout               1 per element
residual add          1 per element of every tensor+tensor addition of equal shapes that
                      happens outside conv/linear/remainder modules (found with a
                      ``TorchFunctionMode``, since models add in ``forward`` code)
====================  ===============================================================

Backward of the remainder is taken as 2× its forward, so its training cost is 3× forward, dense.  Concatenation,
reshapes, padding and the loss are free.  ``training_reduction_with_remainder`` includes this work.

FLOP = 2·MAC everywhere (one multiply + one add); the report shows both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["LayerFlops", "FlopReport", "count_flops", "REMAINDER_CATEGORIES"]

REMAINDER_CATEGORIES = ("normalization", "activation", "pooling", "dropout", "residual_add")

_NORM = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_ACT = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
        nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus)
_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_POOL = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                  nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_ADD_NAMES = frozenset({"add", "add_", "__add__", "__iadd__", "__radd__"})


@dataclass
class LayerFlops:
    """One conv/linear layer of a :class:`FlopReport`; MAC counts are per sample."""

    name: str
    kind: str
    shape: tuple[int, ...]
    macs: float
    d_w: float = 1.0
    d_a: float = 1.0
    measured_d_w: float | None = None
    measured_d_a: float | None = None
    count_grad_input: bool = True
    input_elements: float = 0.0
    train_dense: float = field(init=False)
    train_sparse: float = field(init=False)
    inference_dense: float = field(init=False)
    inference_sparse: float = field(init=False)
    measured_train_sparse: float | None = field(init=False)

    def __post_init__(self) -> None:
        gi = 1.0 if self.count_grad_input else 0.0
        self.train_dense = self.macs * (2.0 + gi)
        self.train_sparse = self.macs * (self.d_w * (1.0 + gi) + self.d_a)
        self.inference_dense = self.macs
        self.inference_sparse = self.macs * self.d_w
        if self.measured_d_w is None and self.measured_d_a is None:
            self.measured_train_sparse = None
        else:
            mw = self.d_w if self.measured_d_w is None else self.measured_d_w
            ma = self.d_a if self.measured_d_a is None else self.measured_d_a
            self.measured_train_sparse = self.macs * (mw * (1.0 + gi) + ma)

    @property
    def training_reduction(self) -> float:
        """``1 − sparse/dense`` training MACs of this layer."""
        return 1.0 - self.train_sparse / self.train_dense if self.train_dense else 0.0


def _reduction(sparse: float, dense: float) -> float:
    return 1.0 - sparse / dense if dense else 0.0


@dataclass
class FlopReport:
    """Per-sample MACs of a model's conv/linear layers plus the dense remainder (see module docstring).

    ``layers`` rows are in call order.  ``remainder`` holds forward MAC-equivalents per category.  Totals are
    properties; every ``*_macs`` total has a ``*_flops`` twin in :meth:`to_dict` (FLOP = 2·MAC).
    """

    input_shape: tuple[int, ...]
    layers: list[LayerFlops]
    remainder: dict[str, float]
    model: str | None = None

    # --- conv/linear totals (the paper's convention) ---------------------------------------------------
    @property
    def forward_macs(self) -> float:
        """Dense forward MACs of the conv/linear layers (``Σ M_l``)."""
        return sum(r.macs for r in self.layers)

    @property
    def train_dense_macs(self) -> float:
        return sum(r.train_dense for r in self.layers)

    @property
    def train_sparse_macs(self) -> float:
        return sum(r.train_sparse for r in self.layers)

    @property
    def inference_dense_macs(self) -> float:
        return sum(r.inference_dense for r in self.layers)

    @property
    def inference_sparse_macs(self) -> float:
        return sum(r.inference_sparse for r in self.layers)

    @property
    def weight_sparsity(self) -> float:
        """Nominal overall weight sparsity ``Σ (1 − d_w)·n_l / Σ n_l`` (layers used more than once count once)."""
        n = [math.prod(r.shape) for r in self.layers]
        total = sum(n)
        return sum((1.0 - r.d_w) * k for r, k in zip(self.layers, n, strict=True)) / total if total else 0.0

    @property
    def activation_sparsity(self) -> float:
        """Nominal activation sparsity: ``1 − d_a`` averaged with weights = conv/linear input elements per sample.

        docs/methods/swat.md ('FLOP accounting') finds the paper's "A%" column close to this
        (e.g. VGG-16 ERK95: 80.2 here, 82 reported).
        """
        total = sum(r.input_elements for r in self.layers)
        return sum((1.0 - r.d_a) * r.input_elements for r in self.layers) / total if total else 0.0

    @property
    def training_reduction(self) -> float:
        """Fraction of training MACs saved over conv/linear layers (§4.1; the paper's numbers)."""
        return _reduction(self.train_sparse_macs, self.train_dense_macs)

    @property
    def inference_reduction(self) -> float:
        """Fraction of inference MACs saved over conv/linear layers (§4.1)."""
        return _reduction(self.inference_sparse_macs, self.inference_dense_macs)

    # --- dense remainder -----------------------------------------------------------------------------
    @property
    def remainder_forward_macs(self) -> float:
        return sum(self.remainder.values())

    @property
    def remainder_train_macs(self) -> float:
        """Forward + backward (2× forward) of the dense remainder."""
        return 3.0 * self.remainder_forward_macs

    @property
    def training_reduction_with_remainder(self) -> float:
        """Training reduction when the always-dense remainder is counted too."""
        rem = self.remainder_train_macs
        return _reduction(self.train_sparse_macs + rem, self.train_dense_macs + rem)

    @property
    def inference_reduction_with_remainder(self) -> float:
        rem = self.remainder_forward_macs
        return _reduction(self.inference_sparse_macs + rem, self.inference_dense_macs + rem)

    # --- measured densities ----------------------------------------------------------------------------
    @property
    def has_measured(self) -> bool:
        return any(r.measured_train_sparse is not None for r in self.layers)

    @property
    def measured_train_sparse_macs(self) -> float | None:
        """Training MACs with measured densities where known, nominal elsewhere; None if nothing was measured."""
        if not self.has_measured:
            return None
        return sum(r.train_sparse if r.measured_train_sparse is None else r.measured_train_sparse
                   for r in self.layers)

    @property
    def measured_training_reduction(self) -> float | None:
        sparse = self.measured_train_sparse_macs
        return None if sparse is None else _reduction(sparse, self.train_dense_macs)

    # --- output ------------------------------------------------------------------------------------------
    def totals(self) -> dict[str, float | None]:
        """All totals (MACs per sample and reductions as fractions)."""
        return {
            "forward_macs": self.forward_macs,
            "train_dense_macs": self.train_dense_macs,
            "train_sparse_macs": self.train_sparse_macs,
            "inference_dense_macs": self.inference_dense_macs,
            "inference_sparse_macs": self.inference_sparse_macs,
            "remainder_forward_macs": self.remainder_forward_macs,
            "remainder_train_macs": self.remainder_train_macs,
            "measured_train_sparse_macs": self.measured_train_sparse_macs,
            "weight_sparsity": self.weight_sparsity,
            "activation_sparsity": self.activation_sparsity,
            "training_reduction": self.training_reduction,
            "inference_reduction": self.inference_reduction,
            "training_reduction_with_remainder": self.training_reduction_with_remainder,
            "inference_reduction_with_remainder": self.inference_reduction_with_remainder,
            "measured_training_reduction": self.measured_training_reduction,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: rows, remainder, totals, and FLOP (= 2·MAC) versions of the MAC totals."""
        totals = self.totals()
        flops = {k.replace("_macs", "_flops"): (None if v is None else 2.0 * v)
                 for k, v in totals.items() if k.endswith("_macs")}
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "units": "per sample; MAC = multiply-accumulate, FLOP = 2*MAC",
            "layers": [{**asdict(r), "shape": list(r.shape)} for r in self.layers],
            "remainder_forward_macs": dict(self.remainder),
            "totals": totals,
            "totals_flops": flops,
        }

    def table(self, max_rows: int | None = None) -> str:
        """Per-layer table and totals as plain text; ``max_rows`` keeps the rows with the most MACs."""
        rows = self.layers
        hidden = 0
        if max_rows is not None and len(rows) > max_rows:
            keep = {id(r) for r in sorted(rows, key=lambda r: -r.macs)[:max_rows]}
            hidden = len(rows) - max_rows
            rows = [r for r in rows if id(r) in keep]
        w = min(max([5, *(len(r.name) for r in rows)]), 60)
        head = (f"{'layer':<{w}} {'kind':<6} {'weight shape':<20} {'fwd MMAC':>9} {'d_w':>6} {'d_a':>6} "
                f"{'meas d_w/d_a':>13} {'train sparse':>12} {'train dense':>11} {'infer sparse':>12}")
        lines = ["per-sample MACs in millions (MMAC); FLOP = 2 x MAC", head, "-" * len(head)]
        for r in rows:
            meas = "-" if r.measured_train_sparse is None else (
                f"{_fmt_opt(r.measured_d_w)}/{_fmt_opt(r.measured_d_a)}")
            lines.append(
                f"{r.name[:w]:<{w}} {r.kind:<6} {'x'.join(map(str, r.shape)):<20} {r.macs / 1e6:9.3f} "
                f"{r.d_w:6.3f} {r.d_a:6.3f} {meas:>13} {r.train_sparse / 1e6:12.3f} {r.train_dense / 1e6:11.3f} "
                f"{r.inference_sparse / 1e6:12.3f}")
        if hidden:
            lines.append(f"... {hidden} smaller layers not shown")
        lines.append("-" * len(head))
        lines += self._summary_lines()
        return "\n".join(lines)

    def _summary_lines(self) -> list[str]:
        g = 1e9
        out = [
            f"input {tuple(self.input_shape)}; per sample; FLOP = 2 x MAC",
            f"conv/linear forward (dense):   {self.forward_macs / g:10.4f} GMAC = "
            f"{2 * self.forward_macs / g:10.4f} GFLOP",
            f"training, dense:               {self.train_dense_macs / g:10.4f} GMAC = "
            f"{2 * self.train_dense_macs / g:10.4f} GFLOP",
            f"training, sparse:              {self.train_sparse_macs / g:10.4f} GMAC = "
            f"{2 * self.train_sparse_macs / g:10.4f} GFLOP",
            f"inference, dense / sparse:     {self.inference_dense_macs / g:10.4f} / "
            f"{self.inference_sparse_macs / g:.4f} GMAC",
            f"dense remainder (BN, act, pool, dropout, add), forward: {self.remainder_forward_macs / g:.4f} GMAC-eq "
            f"({', '.join(f'{k} {v / 1e6:.2f}M' for k, v in self.remainder.items())})",
            f"training FLOP reduction (conv/linear, paper convention): {100 * self.training_reduction:6.2f} %",
            f"inference FLOP reduction (conv/linear):                  {100 * self.inference_reduction:6.2f} %",
            f"training FLOP reduction incl. dense remainder:           "
            f"{100 * self.training_reduction_with_remainder:6.2f} %",
            f"inference FLOP reduction incl. dense remainder:          "
            f"{100 * self.inference_reduction_with_remainder:6.2f} %",
        ]
        out.insert(6, f"nominal sparsity: weights {100 * self.weight_sparsity:.2f} %, activations (conv/linear "
                      f"inputs, element-weighted) {100 * self.activation_sparsity:.2f} %")
        if self.measured_training_reduction is not None:
            out.append(f"training FLOP reduction, measured densities:             "
                       f"{100 * self.measured_training_reduction:6.2f} %")
        return out


def _fmt_opt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


# ----------------------------------------------------------------------------------------------------------
# counting


def _conv_macs(module: nn.Conv2d, output: torch.Tensor) -> float:
    """``H_out·W_out·C_out·(C_in/groups)·kh·kw`` for the whole batch."""
    return float(output.numel()) * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def _linear_macs(module: nn.Linear, output: torch.Tensor) -> float:
    """``in·out`` per position; the output numel already includes batch and any extra leading positions."""
    return float(output.numel()) * module.in_features


def _remainder_cost(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> tuple[str, float] | None:
    """Category and forward MAC-equivalents (whole batch) of a remainder module, or None."""
    if not isinstance(output, torch.Tensor):
        return None
    n_out = float(output.numel())
    if isinstance(module, _NORM):
        return "normalization", 2.0 * n_out
    if isinstance(module, _ACT):
        return "activation", n_out
    if isinstance(module, _POOL):
        k = module.kernel_size
        window = math.prod(k) if isinstance(k, tuple) else k ** (output.dim() - 2)
        return "pooling", n_out * window
    if isinstance(module, _ADAPTIVE_POOL):
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else output
        return "pooling", float(x.numel())
    if isinstance(module, _DROPOUT):
        return "dropout", n_out
    return None


def _is_remainder_module(module: nn.Module) -> bool:
    return isinstance(module, _NORM + _ACT + _POOL + _ADAPTIVE_POOL + _DROPOUT)


class _AddCounter(TorchFunctionMode):
    """Counts elements of tensor+tensor additions of equal shape made outside hooked modules."""

    def __init__(self, depth: list[int]):
        super().__init__()
        self.depth = depth
        self.elements = 0.0

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if (self.depth[0] == 0 and getattr(func, "__name__", "") in _ADD_NAMES and len(args) >= 2
                and isinstance(args[0], torch.Tensor) and isinstance(args[1], torch.Tensor)
                and args[0].shape == args[1].shape and isinstance(out, torch.Tensor)):
            self.elements += float(out.numel())
        return out


def _value(obj: nn.Module, attr: str) -> Any:
    v = getattr(obj, attr, None)
    return v() if callable(v) else v


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


def _check_names(mapping: Mapping[str, Any] | None, known: set[str], what: str) -> None:
    if mapping is None:
        return
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ValueError(f"{what}: no conv/linear layer named {unknown}; layers are {sorted(known)}")


def _densities_for(name: str, module: nn.Module, densities: Mapping[str, tuple[float, float]] | None,
                   measured: Mapping[str, tuple[float, float]] | None
                   ) -> tuple[float, float, float | None, float | None]:
    if densities is not None:
        d_w, d_a = densities.get(name, (1.0, 1.0))
    else:
        nominal = _value(module, "swat_density")
        d_w, d_a = (1.0, 1.0) if nominal is None else nominal
    meas = measured.get(name) if measured is not None else _value(module, "swat_measured_density")
    mw, ma = (None, None) if meas is None else meas
    return float(d_w), float(d_a), (None if mw is None else float(mw)), (None if ma is None else float(ma))


def _example_input(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    ref = next(model.parameters(), None)
    if ref is None:
        ref = next(model.buffers(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    return torch.zeros(input_shape, device=device, dtype=dtype)


def count_flops(
    model: nn.Module,
    input_shape: tuple[int, ...],
    densities: Mapping[str, tuple[float, float]] | None = None,
    measured: Mapping[str, tuple[float, float]] | None = None,
    *,
    count_first_grad_input: bool = True,
    model_name: str | None = None,
) -> FlopReport:
    """Per-sample MACs of ``model`` on an input of ``input_shape`` (batch first), priced with SWAT densities.

    One forward pass on zeros under ``no_grad`` in eval mode (each module's mode is restored afterwards);
    forward hooks on every ``nn.Conv2d`` / ``nn.Linear`` (subclasses too) record ``M_l``, hooks on BN,
    activations, pooling and dropout plus a ``TorchFunctionMode`` for residual adds record the dense
    remainder (module docstring).  Counts are divided by the batch size ``input_shape[0]``.

    ``densities``: ``{layer name: (d_w, d_a)}``; layers not listed are dense.  If None, each layer's
    ``swat_density`` attribute (value or zero-argument method) is used when present, else dense.
    ``measured``: ``{layer name: (d_w, d_a)}`` of measured densities (``None`` entries allowed); if None, each
    layer's ``swat_measured_density`` (value or zero-argument method, may be None) is read.  A module called twice is
    counted twice.  Works on ``torch.device("meta")`` models too (no memory, no compute).
    ``count_first_grad_input=False`` drops the grad-input GEMM of the first conv/linear called
    (the input image needs no gradient); the default keeps it, as the formula of docs/methods/swat.md
    ('FLOP accounting') does.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) < 2 or input_shape[0] < 1:
        raise ValueError(f"input_shape must be (batch, ...) with batch >= 1, got {input_shape}")
    names = {m: n for n, m in model.named_modules()}
    layer_names = {n for m, n in names.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    _check_names(densities, layer_names, "densities")
    _check_names(measured, layer_names, "measured")

    calls: list[tuple[str, nn.Module, float, float]] = []
    remainder = dict.fromkeys(REMAINDER_CATEGORIES, 0.0)
    depth = [0]

    def pre_hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        depth[0] += 1

    def layer_hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        depth[0] -= 1
        macs = _conv_macs(module, output) if isinstance(module, nn.Conv2d) else _linear_macs(module, output)
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        calls.append((names[module], module, macs, 0.0 if x is None else float(x.numel())))

    def rem_hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        depth[0] -= 1
        cost = _remainder_cost(module, inputs, output)
        if cost is not None:
            remainder[cost[0]] += cost[1]

    handles = []
    for m in names:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles += [m.register_forward_pre_hook(pre_hook), m.register_forward_hook(layer_hook)]
        elif _is_remainder_module(m):
            handles += [m.register_forward_pre_hook(pre_hook), m.register_forward_hook(rem_hook)]
    adds = _AddCounter(depth)
    try:
        x = _example_input(model, input_shape)
        with _eval_mode(model), torch.no_grad(), adds:
            model(x)
    finally:
        for h in handles:
            h.remove()
    remainder["residual_add"] += adds.elements

    batch = float(input_shape[0])
    rows: dict[str, LayerFlops] = {}
    for i, (name, module, macs, in_elems) in enumerate(calls):
        if name in rows:  # a module used more than once: accumulate its MACs and inputs
            old = rows[name]
            rows[name] = LayerFlops(old.name, old.kind, old.shape, old.macs + macs / batch, old.d_w, old.d_a,
                                    old.measured_d_w, old.measured_d_a, old.count_grad_input,
                                    old.input_elements + in_elems / batch)
            continue
        d_w, d_a, mw, ma = _densities_for(name, module, densities, measured)
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        rows[name] = LayerFlops(name, kind, tuple(module.weight.shape), macs / batch, d_w, d_a, mw, ma,
                                count_grad_input=count_first_grad_input or i > 0, input_elements=in_elems / batch)
    return FlopReport(input_shape, list(rows.values()), {k: v / batch for k, v in remainder.items()},
                      model=model_name)
