"""SWAT layers: ``nn.Conv2d`` / ``nn.Linear`` subclasses whose training step follows SWAT
(Raihan & Aamodt 2020; docs/methods/swat.md, 'Technical details').

Forward ``Y = op(X, TopK(W))`` with the dense input; backward ``dX`` from ``TopK(W)``, ``dW`` from
``TopK(X)`` (dense: pruned weights keep learning), ``G`` untouched. Thresholds are recomputed exactly
when the controller sets ``recompute`` (every ``topk_period`` steps, §1.3) and reused in between.

The layers reuse the Parameters of the module they replace, and their method state (thresholds,
measured densities) lives in non-persistent buffers, so ``state_dict()`` keys are those of the plain
model; the controller's ``state_dict()`` carries the SWAT state into checkpoints.

Under ``torch.compile`` a SWAT layer's forward runs eagerly (``torch.compiler.disable``: one graph break per
layer): the Top-K thresholds, the custom autograd Functions, the packing and the per-step Python flags
(``recompute``, ``measure``, ``dense_grad``, SWAT-M's changing ``sparsity``) are read only there, so they never
become guards (no recompiles) and Inductor never traces the data-dependent selection; the dense ops between
the layers (BN, ReLU, adds, pooling) are compiled. See docs/methods/swat.md, "torch.compile".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanprop.ops.fusion import FusableConv
from leanprop.ops.sparse_storage import THRESHOLD_ATTR
from leanprop.swat import sparse_kernels as sk
from leanprop.swat.config import SWATConfig
from leanprop.swat.functions import swat_conv2d, swat_filter_conv2d, swat_linear
from leanprop.swat.topk import keep_count, magnitude_threshold, sparsify, structured_keep_mask, structured_scores


def _kept_density(x: torch.Tensor, thr: torch.Tensor | None) -> torch.Tensor:
    """nnz(X_s) / numel as a 0-d float64 tensor on ``x``'s device (no host sync): the entries the saved ``X_s``
    really holds. Zeros never count, also when the threshold is 0 (a layer whose input has more natural ReLU
    zeros than its sparsity asks for)."""
    a = x.detach().abs()
    kept = a > 0 if thr is None else (a >= thr) & (a > 0)
    return kept.sum(dtype=torch.float64) / x.numel()


def top_filters(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Sorted int64 indices of the ``ceil((1-s)·Cout)`` filters with the highest L1 scores, by a fixed-count
    ``topk`` (no host sync; the kept filters on accelerators, device-agnostic). Without ties at the threshold
    these are exactly the filters :func:`structured_keep_mask` keeps; with ties, K of them."""
    scores = structured_scores(weight, "filter")
    k = keep_count(scores.numel(), sparsity)
    return torch.topk(scores, k, sorted=False).indices.sort().values


class SWATMixin:
    """State and Top-K logic shared by the SWAT conv and linear layers."""

    weight: nn.Parameter
    w_threshold: torch.Tensor
    x_threshold: torch.Tensor

    def _init_swat(self, sparsity: float, cfg: SWATConfig, structure: str | None) -> None:
        self.sparsity = float(sparsity)
        self.structure = structure
        self.sparse_eval = cfg.sparse_eval
        self.estimator = cfg.threshold_estimator
        self.sample_size = cfg.sample_size
        self.compress = cfg.compress_saved
        self.structured_compute = cfg.structured_compute
        # (forward, grad-input, grad-weight) kernel: None (dense), "csr" or "coo"; set by the controller's
        # kernel calibration
        self.sparse_ops = sk.NO_SPARSE
        self.dense_grad = True  # this step's weight gradient covers pruned filters (set by the controller)
        self.recompute = True  # set by the controller before each training step
        self.measure = False  # count the realised densities on this step (set by the controller)
        dev = self.weight.device
        self.register_buffer("w_threshold", torch.zeros((), dtype=torch.float32, device=dev), persistent=False)
        self.register_buffer("x_threshold", torch.zeros((), dtype=torch.float32, device=dev), persistent=False)
        # running sums of measured densities: [weight nnz/numel sum, activation nnz/numel sum, count]
        self.register_buffer("density_stats", torch.zeros(3, dtype=torch.float64, device=dev), persistent=False)
        self.refresh_weight_threshold()

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def refresh_weight_threshold(self) -> None:
        """Exact Top-K threshold of the current dense weights (unstructured layers)."""
        if self.structure is None and self.sparsity > 0:
            k = keep_count(self.weight.numel(), self.sparsity)
            self.w_threshold.copy_(magnitude_threshold(self.weight.detach(), k))

    @torch.no_grad()
    def weight_mask(self) -> torch.Tensor | None:
        """Boolean keep-mask of the weights under the current threshold / structure (None: dense)."""
        if self.sparsity <= 0:
            return None
        w = self.weight.detach()
        if self.structure is not None:
            return structured_keep_mask(w, self.sparsity, self.structure).expand_as(w)
        return w.abs() >= self.w_threshold

    def _sparse_weight(self) -> torch.Tensor:
        w = self.weight.detach()
        if self.sparsity <= 0:
            return w
        if self.structure is not None:
            return w * structured_keep_mask(w, self.sparsity, self.structure)
        if self.training and torch.is_grad_enabled() and self._recompute_now():
            self.refresh_weight_threshold()
        w_s = sparsify(w, self.w_threshold)
        if w_s is not w:  # backward rebuilds W_s from W and this threshold (no mask kept; ops.sparse_storage)
            setattr(w_s, THRESHOLD_ATTR, self.w_threshold.detach().clone())
        return w_s

    def _recompute_now(self) -> bool:
        """Exact Top-K on this training step (else the cached thresholds are reused)."""
        return self.recompute

    # ------------------------------------------------------------------ activations
    def _activation_threshold(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.sparsity <= 0:
            return None
        if self._recompute_now():
            k = keep_count(x.numel(), self.sparsity)
            with torch.no_grad():
                self.x_threshold.copy_(magnitude_threshold(x.detach(), k, estimator=self.estimator,
                                                           sample_size=self.sample_size))
        return self.x_threshold

    @torch.no_grad()
    def _measure(self, x: torch.Tensor, w_s: torch.Tensor, x_thr: torch.Tensor | None) -> None:
        """Add this step's realised densities: nnz(W_s) / numel(W) (``w_s`` may be the kept filters only) and
        nnz(X_s) / numel(X)."""
        stats = self.density_stats
        d_w = torch.count_nonzero(w_s).to(torch.float64) / self.weight.numel()
        d_x = _kept_density(x, x_thr)
        stats[:2] += torch.stack([d_w.to(stats.device), d_x.to(stats.device)])  # on the device: no host sync
        stats[2] += 1.0

    # ------------------------------------------------------------------ reporting
    @property
    def swat_density(self) -> tuple[float, float]:
        """Nominal (weight, activation) density: both ``1 - s_l`` (docs/methods/swat.md, 'Distributions')."""
        return (1.0 - self.sparsity, 1.0 - self.sparsity)

    @property
    def swat_measured_density(self) -> tuple[float, float] | None:
        """Mean (weight, activation) density actually seen on the measured training steps."""
        n = float(self.density_stats[2])
        if n == 0:
            return None
        return (float(self.density_stats[0]) / n, float(self.density_stats[1]) / n)

    @torch.compiler.disable
    def _swat_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's forward, eager under ``torch.compile`` (see the module docstring)."""
        if self.training and torch.is_grad_enabled():
            return self._train_forward(x)
        # evaluation / no_grad: no activation Top-K (docs/methods/swat.md, 'No activation Top-K without gradients');
        # sparse weights unless turned off
        return self._plain_op(x, self._sparse_weight() if self.sparse_eval else self.weight)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        w_s = self._sparse_weight()
        x_thr = self._activation_threshold(x)
        if self.measure:
            self._measure(x, w_s, x_thr)
        return self._swat_op(x, w_s, x_thr)

    @torch.no_grad()
    def inference_weights(self) -> dict[str, torch.Tensor]:
        """The weights the evaluation forward uses (``leanprop export``, :mod:`leanprop.export`): ``TopK(W)``
        under the cached threshold or structured mask when ``sparse_eval``, else ``W`` (docs/methods/swat.md,
        'No activation Top-K without gradients')."""
        return {"weight": self._sparse_weight() if self.sparse_eval else self.weight.detach()}

    def extra_repr(self) -> str:  # type: ignore[override]
        s = super().extra_repr()  # type: ignore[misc]
        structure = f", structure={self.structure}" if self.structure else ""
        return f"{s}, sparsity={self.sparsity:.3f}{structure}"


class SWATConv2d(SWATMixin, FusableConv, nn.Conv2d):
    """``nn.Conv2d`` trained with SWAT (any stride, padding, dilation, groups, padding mode).

    As a :class:`~leanprop.ops.fusion.FusableConv` it also runs inside another method's fused unit (BLPA's
    BN->ReLU->conv): forward and ``dX`` with ``TopK(W)``, ``dW`` from ``TopK`` of the decoded input under the
    threshold of the exact input (docs/methods/swat_blpa.md)."""

    def fused_weight(self) -> torch.Tensor | None:
        return self._sparse_weight() if self.sparsity > 0 else None

    def fused_input_threshold(self, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        thr = self._activation_threshold(z)
        if self.measure:
            self._measure(z, weight, thr)
        return thr

    def fused_eval(self, z: torch.Tensor) -> torch.Tensor:
        return self._swat_forward(z)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, sparsity: float, cfg: SWATConfig) -> SWATConv2d:
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        new._init_swat(sparsity, cfg, cfg.structure)
        return new

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, object]:
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0, 0)
        return x, self.padding

    def _swat_op(self, x, w_s, x_thr):
        x, padding = self._pad(x)
        return swat_conv2d(x, self.weight, w_s, self.bias, x_thr, self.stride, padding, self.dilation, self.groups,
                           self.compress, self.sparse_ops)

    def _plain_op(self, x, w):
        x, padding = self._pad(x)
        return F.conv2d(x, w, self.bias, self.stride, padding, self.dilation, self.groups)

    def computes_kept_filters(self) -> bool:
        """Whether training steps run only the kept filters (``structure="filter"``, groups 1, numeric padding)."""
        return (self.structure == "filter" and self.structured_compute and self.sparsity > 0 and self.groups == 1
                and not isinstance(self.padding, str))

    def kept_filters(self) -> torch.Tensor:
        """Sorted int64 indices of the output filters the current Top-K keeps.

        On CPU: every filter whose L1 score reaches the Top-K threshold (ties kept, as the mask of
        :func:`structured_keep_mask`). On accelerators: the ``K = ceil((1-s)·Cout)`` highest scores by a
        fixed-count ``topk`` (no host sync; a tie at the threshold keeps exactly K, not every tied filter)."""
        w = self.weight.detach()
        with torch.no_grad():
            if w.device.type != "cpu":
                return top_filters(w, self.sparsity)
            mask = structured_keep_mask(w, self.sparsity, "filter")
        return mask.view(-1).nonzero().view(-1)

    def _filter_forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.kept_filters()
        x_thr = self._activation_threshold(x)
        if self.measure:
            self._measure(x, self.weight.detach().index_select(0, keep), x_thr)
        x, padding = self._pad(x)
        return swat_filter_conv2d(x, self.weight, keep, self.bias, x_thr, self.stride, padding, self.dilation,
                                  dense_grad=self.dense_grad, compress=self.compress)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and self.computes_kept_filters():
            return self._filter_forward(x)
        return super()._train_forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_fused_unit:  # the fused unit ran this conv already (ops.fusion)
            return x
        return self._swat_forward(x)


class SWATLinear(SWATMixin, nn.Linear):
    """``nn.Linear`` trained with SWAT (any number of leading input dimensions)."""

    @classmethod
    def from_dense(cls, linear: nn.Linear, sparsity: float, cfg: SWATConfig) -> SWATLinear:
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        new.every_step = cfg.linear_topk_every_step
        new._init_swat(sparsity, cfg, None)  # linear layers are always unstructured, as in the official code
        return new

    def _recompute_now(self) -> bool:
        # the official code does exact Top-K of linear W and X on every step (docs/methods/swat.md, 'Top-K period')
        return self.recompute or self.every_step

    def _swat_op(self, x, w_s, x_thr):
        return swat_linear(x, self.weight, w_s, self.bias, x_thr, self.compress, self.sparse_ops)

    def _plain_op(self, x, w):
        return F.linear(x, w, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._swat_forward(x)


SWAT_LAYERS = (SWATConv2d, SWATLinear)


def to_dense(layer: nn.Module) -> nn.Module:
    """A plain ``nn.Conv2d`` / ``nn.Linear`` holding the same Parameters as a SWAT layer."""
    if isinstance(layer, SWATConv2d):
        new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta")
    elif isinstance(layer, SWATLinear):
        new = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    else:
        raise TypeError(f"not a SWAT layer: {type(layer).__name__}")
    new.weight = layer.weight
    new.bias = layer.bias
    new.train(layer.training)
    return new
