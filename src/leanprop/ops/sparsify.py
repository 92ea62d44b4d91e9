"""Magnitude sparsification shared by the methods: ``sparsify(t, thr)`` keeps ``t`` where ``|t| >= thr`` (the
Top-K "drop" of Raihan & Aamodt 2020, §3.1, given the K-th largest magnitude as ``thr``) and ``magnitude_mask``.

The threshold is compared exactly as fp32 whatever ``t``'s dtype (see :func:`sparsify`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sparsify", "magnitude_mask", "compiling"]


def _largest_below(thr: Tensor, dtype: torch.dtype) -> Tensor:
    """The largest ``dtype`` value strictly below the fp32 threshold, as a 0-d ``dtype`` tensor (no host sync):
    for x of that dtype, ``|x| > result`` ⟺ ``|x| >= thr``."""
    thr = thr.to(torch.float32)
    c = thr.to(dtype)
    return torch.where(c.to(torch.float32) >= thr, torch.nextafter(c, torch.zeros_like(c)), c)


@functools.lru_cache(maxsize=4096)
def _hardshrink_lambda(thr: float, dtype: torch.dtype) -> float:
    """λ for ``F.hardshrink`` so that ``|t| > λ`` ⟺ ``|t| >= thr`` for ``t`` of ``dtype`` (cached: thresholds
    change only at Top-K recomputes, so this is computed once per layer and period)."""
    return float(_largest_below(torch.tensor(thr, dtype=torch.float32), dtype))


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing the caller."""
    fn = getattr(torch.compiler, "is_compiling", None)
    return bool(fn()) if fn is not None else False


def magnitude_mask(t: Tensor, thr: Tensor | float) -> Tensor:
    """Boolean mask ``|t| >= thr`` with the comparison done exactly against the fp32 threshold."""
    a = t.abs()
    if a.dtype in (torch.float32, torch.float64):
        return a >= (thr.to(a.dtype) if isinstance(thr, Tensor) else thr)
    return a.float() >= thr


def sparsify(t: Tensor, thr: Tensor | float | None) -> Tensor:
    """``t`` where ``|t| >= thr``, else 0 (same dtype, shape and memory format); the official code's ``drop_threshold``.

    The threshold is taken as fp32 (a float is rounded to fp32 first) and compared exactly, whatever ``t``'s dtype.
    ``thr`` None, <= 0 or NaN returns ``t`` itself (no copy). A Python float, or a tensor on CPU, runs one fused
    ``hardshrink`` with λ = the largest value of ``t``'s dtype below ``thr`` (|t| > λ ⟺ |t| >= thr); reading a
    CPU tensor into a float costs nothing. On accelerators and under ``torch.compile`` a tensor threshold stays on
    the device (``torch.where``, no host sync; a threshold <= 0 then returns a copy). NaNs in ``t`` are kept by
    the fused path and dropped by the ``where`` path.
    """
    if thr is None:
        return t
    if isinstance(thr, Tensor):
        if t.device.type != "cpu" or compiling() or not t.is_floating_point():
            lam = _largest_below(thr, t.dtype) if t.is_floating_point() else thr
            cond = t.abs() > lam if t.is_floating_point() else t.abs() >= thr
            return torch.where(cond, t, torch.zeros((), dtype=t.dtype, device=t.device))
        thr = float(thr)
    thr = float(thr)
    if not thr > 0.0:
        return t
    if not t.is_floating_point():
        return torch.where(t.abs() >= thr, t, torch.zeros((), dtype=t.dtype, device=t.device))
    return F.hardshrink(t, _hardshrink_lambda(thr, t.dtype))
