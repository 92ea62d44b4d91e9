"""An ideal analytic model of a sparse training accelerator (Raihan & Aamodt, NeurIPS 2020; docs/methods/swat.md).

Model.  A zero-skipping processing-element array whose time is proportional to the number of MACs it performs
on operand pairs whose *sparse* operand is non-zero:

* forward ``Y = W_s * X`` and grad-input ``dX = G * W_s`` skip zero weights: ``M_l·d_w`` each;
* grad-weight ``dW = G * X_s`` skips zero activations: ``M_l·d_a``; ``G`` is dense and never skipped;
* no load imbalance, no index/metadata overhead, no Top-K cost, no memory stalls;
* the dense remainder (BN, ReLU, pooling, residual adds, dropout — see :mod:`leanprop.accounting.flops`) runs
  at the same rate, dense, with backward = 2× forward.

Speed-up = dense time / sparse time for the forward pass, the backward pass (grad-input + grad-weight) and
the whole training step.

Why this *exceeds* the paper's DNNsim figures (3.3×/3.4× forward/backward at 80 %, 5.6×/6.3× at 90 %, ResNet-50
ImageNet; which simulated architecture and configuration gave them is not known here; docs/methods/swat.md,
'Accelerator model').  ``1/density`` is
the ceiling a zero-skipping design approaches only with perfect scheduling.  A cycle-level simulator charges
what this model ignores: a scheduler that may promote non-zero operands only from a small window of upcoming
work (TensorDash-style designs) caps the per-lane gain; lanes and PEs that share a tile wait for the densest
one (load imbalance, worse for unstructured and per-mini-batch Top-K sparsity); memory traffic for the dense
``G`` and for activations does not shrink with compute; and sparse-format metadata and the Top-K selection cost
cycles.  The dense first layer and the dense remainder, which this model does count, bound the gain further.
Treat the output as an upper bound, not as a prediction of DNNsim.
"""

from __future__ import annotations

from typing import Any

from leanprop.ops.flops import FlopReport

__all__ = ["estimate_speedup", "format_speedup", "paper_dnnsim", "PAPER_DNNSIM"]

#: DNNsim speed-ups reported on the authors' poster (``swat_poster.pptx`` in the official repository):
#: Top-K sparsity -> (forward, backward).
PAPER_DNNSIM: dict[float, tuple[float, float]] = {0.0: (1.0, 1.0), 0.8: (3.3, 3.4), 0.9: (5.6, 6.3)}


def paper_dnnsim(sparsity: float | None) -> dict[str, float] | None:
    """The paper's DNNsim (forward, backward) speed-up for exactly this sparsity, or None if it reports none."""
    if sparsity is None:
        return None
    for s, (fwd, bwd) in PAPER_DNNSIM.items():
        if abs(s - sparsity) < 1e-9:
            return {"sparsity": s, "forward": fwd, "backward": bwd}
    return None


def _ratio(dense: float, sparse: float) -> float:
    return dense / sparse if sparse > 0 else float("inf")


def _phase_times(report: FlopReport, with_remainder: bool) -> dict[str, float]:
    """Dense and sparse MAC counts (∝ time) of the forward and backward passes."""
    fwd_dense = report.inference_dense_macs
    fwd_sparse = report.inference_sparse_macs
    bwd_dense = report.train_dense_macs - fwd_dense
    bwd_sparse = report.train_sparse_macs - fwd_sparse
    if with_remainder:
        rem = report.remainder_forward_macs
        fwd_dense, fwd_sparse = fwd_dense + rem, fwd_sparse + rem
        bwd_dense, bwd_sparse = bwd_dense + 2.0 * rem, bwd_sparse + 2.0 * rem
    return {"fwd_dense": fwd_dense, "fwd_sparse": fwd_sparse, "bwd_dense": bwd_dense, "bwd_sparse": bwd_sparse}


def _speedups(t: dict[str, float]) -> dict[str, float]:
    return {
        "forward": _ratio(t["fwd_dense"], t["fwd_sparse"]),
        "backward": _ratio(t["bwd_dense"], t["bwd_sparse"]),
        "training": _ratio(t["fwd_dense"] + t["bwd_dense"], t["fwd_sparse"] + t["bwd_sparse"]),
    }


def estimate_speedup(report: FlopReport, sparsity: float | None = None) -> dict[str, Any]:
    """Ideal zero-skipping speed-ups (module docstring) of the model priced in ``report``.

    Returns ``forward``, ``backward`` and ``training`` speed-ups with the dense remainder included (the
    headline numbers), the same over conv/linear work only under ``"conv_linear_only"``, and the paper's DNNsim
    figures for ``sparsity`` under ``"paper_dnnsim"`` (None when the paper reports none for it).
    """
    out: dict[str, Any] = _speedups(_phase_times(report, with_remainder=True))
    out["conv_linear_only"] = _speedups(_phase_times(report, with_remainder=False))
    out["paper_dnnsim"] = paper_dnnsim(sparsity)
    out["model"] = ("ideal zero-skipping PE array: time proportional to non-zero MACs (forward and grad-input "
                    "skip zero weights, grad-weight skips zero activations, G dense), no overheads; dense "
                    "remainder at the same rate")
    return out


def format_speedup(est: dict[str, Any]) -> str:
    """Two lines of text: the ideal estimate and, when known, the paper's DNNsim figure next to it."""
    cl = est["conv_linear_only"]
    line = (f"ideal accelerator speed-up: forward {est['forward']:.2f}x, backward {est['backward']:.2f}x, "
            f"training {est['training']:.2f}x (conv/linear only: {cl['forward']:.2f}x / {cl['backward']:.2f}x / "
            f"{cl['training']:.2f}x)")
    paper = est.get("paper_dnnsim")
    if paper is None:
        return line + ("\npaper (DNNsim, ResNet-50 ImageNet): reported only for uniform 80 % (3.3x / 3.4x) "
                       "and 90 % (5.6x / 6.3x)")
    return line + (f"\npaper (DNNsim, ResNet-50 ImageNet) at {100 * paper['sparsity']:.0f} %: forward "
                   f"{paper['forward']:.1f}x, backward {paper['backward']:.1f}x — an upper bound above a cycle-level "
                   "simulation (see leanprop.accounting.accelerator)")
