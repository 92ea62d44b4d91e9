"""Generic saved-tensor codec for everything outside BLPA's fused units (spec §5.1, GACT-style).

Installed with ``torch.autograd.graph.saved_tensors_hooks`` around the model's forward (``convert_`` does it
with forward hooks on the root module), it keeps parameters, integer/bool tensors, packed codes and small
tensors as they are, stores each float tensor at most once (a tensor saved by several ops -- e.g. a ReLU
output saved by the ReLU and by the next conv -- is de-duplicated on ``(data_ptr, version, shape, stride)``,
and only while that tensor is alive: the codec does not keep what it packed, so a freed tensor's memory may
be reused by a later one with the same key, which must not be taken for it)
and stores it as ``bits``-bit codes with a per-group (256 contiguous elements) minimum and step, rounding to
nearest. Eager only: saved-tensor hooks are not traced by ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from leanprop.blpa.packing import flat_memory_view, from_flat_memory, memory_format_of, pack_bits, unpack_bits

__all__ = ["SavedTensorCodec", "find_codec", "GROUP"]

GROUP = 256


class _Packed:
    """A compressed saved tensor: codes + per-group (min, step), and how to rebuild the original."""

    __slots__ = ("codes", "lo", "step", "shape", "dtype", "fmt", "numel", "bits")

    def __init__(self, t: torch.Tensor, bits: int):
        self.shape, self.dtype, self.fmt, self.numel, self.bits = t.shape, t.dtype, memory_format_of(t), t.numel(), bits
        flat = flat_memory_view(t.detach()).float()
        pad = (-flat.numel()) % GROUP
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        g = flat.view(-1, GROUP)
        lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
        levels = (1 << bits) - 1
        step = ((hi - lo) / levels).clamp_min_(torch.finfo(torch.float32).tiny)
        q = ((g - lo) / step).round_().clamp_(0, levels).to(torch.uint8).view(-1)
        self.codes = pack_bits(q, bits)
        self.lo, self.step = lo, step

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.lo, self.step]

    def unpack(self) -> torch.Tensor:
        q = unpack_bits(self.codes, self.bits, self.lo.numel() * GROUP).view(-1, GROUP).float()
        flat = (q * self.step + self.lo).view(-1)[: self.numel].to(self.dtype)
        return from_flat_memory(flat.contiguous(), self.shape, self.fmt).contiguous(memory_format=self.fmt)


class SavedTensorCodec:
    """Pack/unpack hooks that compress float tensors saved for backward (see the module docstring).

    ``bits=None`` keeps every tensor as it is (an auditing pass-through). ``recording(ledger)`` reports each
    tensor actually kept to ``ledger.record(tensor, kind)`` (kind None: the ledger classifies it).
    """

    def __init__(self, bits: int | None = 8, min_bytes: int = 65536):
        if bits not in (None, 4, 8):
            raise ValueError(f"codec bits must be 4, 8 or None, got {bits!r}")
        self.bits = bits
        self.min_bytes = int(min_bytes)
        self._ledger: Any = None
        self._seen: dict[tuple, Any] = {}
        self._params: set[int] = set()
        self._depth = 0

    # -- installation -----------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Wrap every forward of ``model`` in the hooks (undone by :meth:`detach`)."""
        self._params = {p.data_ptr() for p in model.parameters()}
        self._handles = [model.register_forward_pre_hook(self._enter),
                         model.register_forward_hook(self._exit, always_call=True)]

    def detach(self) -> None:
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []

    def _enter(self, module: nn.Module, args: Any) -> None:
        if self._depth == 0:
            self._seen = {}
            self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
            self._ctx.__enter__()
        self._depth += 1

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._ctx.__exit__(None, None, None)
            self._seen = {}

    @contextlib.contextmanager
    def recording(self, ledger: Any) -> Iterator[None]:
        self._ledger = ledger
        try:
            yield
        finally:
            self._ledger = None

    # -- hooks --------------------------------------------------------------------------------------
    def _record(self, t: torch.Tensor, kind: str | None) -> None:
        if self._ledger is not None:
            self._ledger.record(t, kind)

    def pack(self, t: torch.Tensor) -> Any:
        # 1-D tensors are not exempt: SWAT's packed X_s values (the kept activations) are 1-D and become codes
        keep = (self.bits is None or not t.is_floating_point() or isinstance(t, nn.Parameter)
                or t.data_ptr() in self._params or t.numel() * t.element_size() < self.min_bytes)
        if keep:
            self._record(t, None)
            return t
        key = (t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype)
        hit = self._seen.get(key)
        # a live weak reference proves the memory still belongs to the tensor packed under this key
        packed = hit[0] if hit is not None and hit[1]() is not None else None
        if packed is None:
            packed = _Packed(t, self.bits)
            self._seen[key] = (packed, weakref.ref(t))
            for part in packed.tensors():
                self._record(part, "codes" if part.dtype == torch.uint8 else None)
        return packed

    @staticmethod
    def unpack(obj: Any) -> torch.Tensor:
        return obj.unpack() if isinstance(obj, _Packed) else obj


def find_codec(model: nn.Module) -> SavedTensorCodec | None:
    """The codec ``convert_`` attached to ``model``'s forward, if any."""
    for hook in model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, SavedTensorCodec):
            return owner
    return None
