"""Autocast helpers shared by the methods' autograd Functions and the step loops.

A custom Function runs its forward with autocast off and casts itself, as ``nn.Conv2d`` would under autocast
(PyTorch docs, "Automatic Mixed Precision": floating tensors other than float64 go to the autocast dtype).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["autocast_dtype", "autocast_off", "cast", "to_dtype", "autocast_context", "AMP_DTYPES"]

#: ``train.amp`` / benchmark ``dtype`` names -> torch dtypes (fp32: no autocast)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device | str, amp: str | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` ("bf16" / "fp16") on ``device``'s type; a no-op for None / "fp32"."""
    dtype = AMP_DTYPES.get(amp) if amp else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype for this device type, or None when autocast is off."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError):  # torch < 2.4 or a device type without autocast
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None


def autocast_off(device_type: str, active: bool):
    """Autocast disabled for the block when ``active`` (a no-op context otherwise)."""
    return torch.autocast(device_type, enabled=False) if active else contextlib.nullcontext()


def cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """Autocast's rule: floating tensors other than float64 go to the autocast dtype."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def to_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype`` (no copy when it already is; None stays None)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)
