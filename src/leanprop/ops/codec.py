"""Generic saved-tensor codec for everything outside BLPA's fused units (GACT-style, Liu et al. 2022;
docs/methods/blpa.md, 'Generic codec').

Installed with ``torch.autograd.graph.saved_tensors_hooks`` around the model's forward (``convert_`` does it
with forward hooks on the root module), it keeps parameters, integer/bool tensors, packed codes and small
tensors as they are, stores each float tensor at most once (a tensor saved by several ops -- e.g. a ReLU
output saved by the ReLU and by the next conv -- is de-duplicated on ``(data_ptr, version, shape, stride)``,
and only while that tensor is alive: the codec does not keep what it packed, so a freed tensor's memory may
be reused by a later one with the same key, which must not be taken for it)
and stores it as ``bits``-bit codes with a per-group (256 contiguous elements) minimum and step, rounding to
nearest.

Only activations are coded. A parameter is recognised by its storage and kept as it is; a *copy* of a
parameter -- the cast ``torch.autocast`` makes of every weight (a plain tensor, not the Parameter), or the
channels-last copy ``torch.compile`` may keep -- by value: a saved tensor of two or more dimensions with a
parameter's shape (or, 2-D, its transpose) that equals that parameter cast to the tensor's dtype is replaced by
a reference to the parameter, and the backward gets the same cast again (same values, dtype and strides; an
in-place change of the parameter in between is an error, as autograd's own check on saved tensors). The check
costs one weight-sized comparison per candidate, and candidates are only tensors whose shape is a parameter's
(docs/methods/blpa.md, "Generic codec").

Under ``torch.compile`` the hooks are installed eagerly (the entry and exit hooks are excluded from tracing) and
apply to what each compiled region saves for its backward, as in eager they apply to what each op saves.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from leanprop.ops.packing import pack_bits, unpack_bits

__all__ = ["SavedTensorCodec", "find_codec", "GROUP"]

GROUP = 256


class _Packed:
    """A compressed saved tensor: codes + per-group (min, step), and how to rebuild the original.

    Groups are 256 consecutive elements in the tensor's *logical* (NCHW) order whatever its memory layout, so a
    channels-last copy of a tensor gets the same codes as the tensor (``torch.compile`` may save the one where
    eager saves the other); the rebuilt tensor has the original's strides."""

    __slots__ = ("codes", "lo", "step", "shape", "stride", "dtype", "numel", "bits")

    def __init__(self, t: torch.Tensor, bits: int):
        self.shape, self.stride, self.dtype, self.numel, self.bits = t.shape, t.stride(), t.dtype, t.numel(), bits
        flat = t.detach().reshape(-1).float()
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
        logical = (q * self.step + self.lo).view(-1)[: self.numel].to(self.dtype).view(self.shape)
        if logical.stride() == self.stride:
            return logical
        out = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=logical.device)
        return out.copy_(logical)


class _ParamRef:
    """A saved copy of a parameter (e.g. its autocast cast), kept as a reference to the parameter itself."""

    __slots__ = ("param", "transposed", "version", "dtype", "stride")

    def __init__(self, param: torch.Tensor, transposed: bool, t: torch.Tensor):
        self.param, self.transposed, self.version = param, transposed, param._version
        self.dtype, self.stride = t.dtype, t.stride()

    def unpack(self) -> torch.Tensor:
        p = self.param
        if p._version != self.version:
            raise RuntimeError(f"a parameter of shape {tuple(p.shape)} saved for backward (as a {self.dtype} copy) was "
                               f"modified in place before backward (version {self.version}, now {p._version}); "
                               "update parameters only after backward, as with any saved tensor")
        v = (p.detach().t() if self.transposed else p.detach()).to(self.dtype)
        if v.stride() == self.stride:
            return v
        return torch.empty_strided(v.shape, self.stride, dtype=v.dtype, device=v.device).copy_(v)


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
        self._by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, bool]]] = {}
        self._depth = 0
        #: counts of the last forward: ``coded`` tensors, ``kept`` (passed through: small, integer, parameters),
        #: ``param_copies`` (copies of a parameter, e.g. its autocast cast, kept as a reference to it)
        self.stats: dict[str, int] = {"coded": 0, "kept": 0, "param_copies": 0}

    # -- installation -----------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Wrap every forward of ``model`` in the hooks (undone by :meth:`detach`)."""
        self._index_parameters(model)
        self._handles = [model.register_forward_pre_hook(self._enter),
                         model.register_forward_hook(self._exit, always_call=True)]

    def _index_parameters(self, model: nn.Module) -> None:
        """Storages and shapes of ``model``'s parameters, taken at every forward (``.to(device)``, ``channels_last``
        or a loaded state may have replaced the storages since :meth:`attach`)."""
        params = [p for p in model.parameters() if p.is_floating_point()]
        self._params = {p.data_ptr() for p in params}
        by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, bool]]] = {}
        for p in params:
            by_shape.setdefault(tuple(p.shape), []).append((p, False))
            if p.dim() == 2:  # a linear layer's backward may keep the transposed weight
                by_shape.setdefault(tuple(p.shape[::-1]), []).append((p, True))
        self._by_shape = by_shape

    def detach(self) -> None:
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []

    @torch.compiler.disable
    def _enter(self, module: nn.Module, args: Any) -> None:
        if self._depth == 0:
            self._seen = {}
            self.stats = {"coded": 0, "kept": 0, "param_copies": 0}
            self._index_parameters(module)
            self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
            self._ctx.__enter__()
        self._depth += 1

    @torch.compiler.disable
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

    def _parameter_of(self, t: torch.Tensor) -> _ParamRef | None:
        """A reference to the parameter whose values ``t`` holds (e.g. its autocast cast), see the module docstring."""
        for p, transposed in self._by_shape.get(tuple(t.shape), ()):
            if p.device == t.device and torch.equal((p.detach().t() if transposed else p.detach()).to(t.dtype), t):
                return _ParamRef(p, transposed, t)
        return None

    def pack(self, t: torch.Tensor) -> Any:
        if (self.bits is None or not t.is_floating_point() or isinstance(t, nn.Parameter)
                or t.data_ptr() in self._params):
            return self._keep(t)
        ref = self._parameter_of(t) if t.dim() >= 2 else None
        if ref is not None:
            self.stats["param_copies"] += 1
            self._record(ref.param, None)
            return ref
        # 1-D tensors are not exempt: SWAT's packed X_s values (the kept activations) are 1-D and become codes;
        # a tensor whose elements overlap or leave gaps (an expanded or strided view) is kept: its strides could
        # not be rebuilt from codes
        if t.numel() * t.element_size() < self.min_bytes or not _dense(t):
            return self._keep(t)
        key = (t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype)
        hit = self._seen.get(key)
        # a live weak reference proves the memory still belongs to the tensor packed under this key
        packed = hit[0] if hit is not None and hit[1]() is not None else None
        if packed is None:
            packed = _Packed(t, self.bits)
            self.stats["coded"] += 1
            self._seen[key] = (packed, weakref.ref(t))
            for part in packed.tensors():
                self._record(part, "codes" if part.dtype == torch.uint8 else None)
        return packed

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        self.stats["kept"] += 1
        self._record(t, None)
        return t

    @staticmethod
    def unpack(obj: Any) -> torch.Tensor:
        return obj.unpack() if isinstance(obj, (_Packed, _ParamRef)) else obj


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its memory span exactly once (any order of dimensions)."""
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True) if n > 1)
    return span == t.numel() and all(st > 0 for n, st in zip(t.shape, t.stride(), strict=True) if n > 1)


def find_codec(model: nn.Module) -> SavedTensorCodec | None:
    """The codec ``convert_`` attached to ``model``'s forward, if any (also through ``torch.compile``'s wrapper)."""
    model = getattr(model, "_orig_mod", model)
    for hook in model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, SavedTensorCodec):
            return owner
    return None
