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

With ``by_op=True`` the codec also knows which op saves each tensor (a ``TorchFunctionMode`` active during the
forward records the innermost torch function being called, whether a module or an ``F.*`` call in a user's
forward made it) and stores it by the op's need (:data:`OP_KINDS`; docs/methods/blpa.md, "Storage policy"):

* ReLU / ReLU6 / Hardtanh / LeakyReLU: a 1-bit mask (exact: their backward reads only which side of the
  threshold(s) each element was on); dropout's keep-mask (bool, or the scaled float ``{0, 1/(1-p)}``): 1 bit;
* max-pool and average-pool inputs: nothing but the shape (their backward reads only the sizes); max-pool
  indices: int16 (or int32) instead of int64;
* every other float tensor (conv / linear / BatchNorm / LayerNorm / smooth-activation inputs...): ``bits``-bit
  codes per group of 256 elements, with unbiased stochastic rounding when ``stochastic`` (ActNN, Chen et al.
  2021, §3.2), drawn from the codec's own generator, reseeded with ``(seed, step)`` at every forward (so a resumed
  run, and a compiled model, draw what the eager run draws); ``policy`` overrides the bits per op kind.

Under ``torch.compile`` the hooks are installed eagerly (the entry and exit hooks are excluded from tracing) and
apply to what each compiled region saves for its backward, as in eager they apply to what each op saves.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from leanprop.ops.bn_units import (
    AffineCodes,
    BNInput,
    BNRecord,
    LNRecord,
    RecipeValue,
    ReluOfBN,
    SavedValue,
    SumRecipe,
    UnaryRecipe,
    tensor_key,
)
from leanprop.ops.packing import pack_bits, restride, unpack_bits

__all__ = ["SavedTensorCodec", "find_codec", "GROUP", "OP_KINDS", "op_kind"]

GROUP = 256

#: The op kinds of the storage policy (:func:`op_kind`), each with the torch function names that make it.
OP_KINDS: dict[str, tuple[str, ...]] = {
    "relu": ("relu", "relu_"),
    "hardtanh": ("hardtanh", "hardtanh_", "relu6"),
    "leaky_relu": ("leaky_relu", "leaky_relu_"),
    "max_pool": ("max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
                 "max_pool3d_with_indices", "_max_pool1d", "_max_pool2d", "_max_pool3d", "adaptive_max_pool1d",
                 "adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_max_pool1d_with_indices",
                 "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices", "_adaptive_max_pool1d",
                 "_adaptive_max_pool2d", "_adaptive_max_pool3d"),
    "avg_pool": ("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                 "adaptive_avg_pool3d"),
    "dropout": ("dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout"),
    "conv": ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
    "linear": ("linear", "bilinear", "matmul", "mm", "bmm", "addmm", "__matmul__"),
    "batch_norm": ("batch_norm", "instance_norm"),
    "norm": ("layer_norm", "group_norm", "rms_norm"),
    "smooth": ("silu", "silu_", "gelu", "hardswish", "hardswish_", "mish", "sigmoid", "sigmoid_", "tanh", "tanh_",
               "softplus", "elu", "elu_", "selu", "celu", "hardsigmoid"),
}
_KIND_OF = {name: kind for kind, names in OP_KINDS.items() for name in names}
_ADD_NAMES = frozenset({"add", "add_", "__add__", "__iadd__", "__radd__"})
_UNARY_PENDING = object()
_SAVES_RESULT = frozenset({"sigmoid", "sigmoid_", "tanh", "tanh_"})
#: elementwise activations whose output is rebuilt from their input (:class:`leanprop.ops.bn_units.UnaryRecipe`)
_UNARY = {"gelu": F.gelu, "silu": F.silu, "silu_": F.silu, "sigmoid": torch.sigmoid, "sigmoid_": torch.sigmoid,
          "tanh": torch.tanh, "tanh_": torch.tanh, "hardswish": F.hardswish, "hardswish_": F.hardswish, "mish": F.mish}


def op_kind(func: Any) -> str:
    """The storage-policy kind of a torch function (``"other"`` when it is none of :data:`OP_KINDS`)."""
    return _KIND_OF.get(getattr(func, "__name__", ""), "other")


class _Packed:
    """A compressed saved tensor: codes + per-group (min, step), and how to rebuild the original.

    Groups are 256 consecutive elements in the tensor's *logical* (NCHW) order whatever its memory layout, so a
    channels-last copy of a tensor gets the same codes as the tensor (``torch.compile`` may save the one where
    eager saves the other); the rebuilt tensor has the original's strides.

    ``exact_zero``: in a group whose minimum is 0, every positive value gets a code of at least 1, so the rebuilt
    tensor is zero exactly where the original is -- for a tensor whose op is unknown (what a compiled graph saves),
    whose backward may read a ReLU mask off it (``result > 0``). (Moving codes to keep every sign, as a mask of a
    signed tensor would need, costs more accuracy elsewhere than it gains: measured on compiled user models.)"""

    __slots__ = ("codes", "lo", "step", "shape", "stride", "dtype", "numel", "bits", "kernels")

    def __init__(self, t: torch.Tensor, bits: int, generator: torch.Generator | None = None, kernels: Any = None,
                 exact_zero: bool = False):
        self.shape, self.stride, self.dtype, self.numel, self.bits = t.shape, t.stride(), t.dtype, t.numel(), bits
        flat = t.detach().reshape(-1).float()
        pad = (-flat.numel()) % GROUP
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        g = flat.view(-1, GROUP)
        self.kernels = kernels if kernels is not None and g.device.type == "cpu" else None
        if self.kernels is not None:  # one compiled pass: ranges, rounding and packing
            seeds = None if generator is None else torch.randint(
                -(2**63), 2**63 - 1, (g.shape[0],), generator=generator, dtype=torch.int64)
            self.codes, self.lo, self.step = self.kernels.group_encode(g.contiguous(), bits, seeds, exact_zero)
            return
        lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
        levels = (1 << bits) - 1
        step = ((hi - lo) / levels).clamp_min_(torch.finfo(torch.float32).tiny)
        scaled = (g - lo) / step
        if generator is None:  # round to nearest
            scaled.round_()
        else:  # unbiased stochastic rounding: floor(v + u), u ~ U[0, 1)
            scaled.add_(torch.rand(scaled.shape, generator=generator, device=scaled.device)).floor_()
        q = scaled.clamp_(0, levels).to(torch.uint8)
        if exact_zero:
            q += ((q == 0) & (g > 0) & (lo == 0)).to(torch.uint8)
        self.codes = pack_bits(q.view(-1), bits)
        self.lo, self.step = lo, step

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.lo, self.step]

    def unpack(self) -> torch.Tensor:
        if self.kernels is not None:
            values = self.kernels.group_decode(self.codes, self.lo, self.step, self.bits, GROUP)
        else:
            q = unpack_bits(self.codes, self.bits, self.lo.numel() * GROUP).view(-1, GROUP).float()
            values = q * self.step + self.lo
        return restride(values.view(-1)[: self.numel].to(self.dtype).view(self.shape), self.stride)


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
        return restride((p.detach().t() if self.transposed else p.detach()).to(self.dtype), self.stride)


def _pack_bool(flat: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor as bits, most significant first (NumPy's packbits on CPU: one C pass)."""
    if flat.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.packbits(flat.contiguous().numpy()))
    n = flat.numel()
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)


def _unpack_bool(bits: torch.Tensor, numel: int) -> torch.Tensor:
    if bits.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).view(np.bool_))
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).view(-1)[:numel].bool()


class _Mask:
    """A tensor an op reads only through one comparison, kept as a 1-bit mask (see :class:`SavedTensorCodec`).

    ``inside``/``outside``: the values the rebuilt tensor holds where the mask is set / clear (chosen so that the
    op's backward takes the same branch as with the original); a bool tensor is rebuilt as itself. The bits follow
    the memory order of a channels-last mask (``channels_last``), else its logical (NCHW) order."""

    __slots__ = ("bits", "shape", "stride", "dtype", "inside", "outside", "channels_last", "kernels")

    def __init__(self, mask: torch.Tensor, like: torch.Tensor, inside: float, outside: float, kernels: Any = None):
        self.kernels = kernels if mask.device.type == "cpu" else None  # the compiled expansion, or None
        flat, self.channels_last = _in_memory_order(mask)
        self.bits = _pack_bool(flat)
        self.shape, self.stride, self.dtype = like.shape, like.stride(), like.dtype
        self.inside, self.outside = inside, outside

    @classmethod
    def positive(cls, t: torch.Tensor, inside: float, outside: float, kernels: Any = None) -> _Mask:
        """The mask ``t > 0``, straight from ``t`` by the compiled kernels where they take it (CPU fp32/bf16, NCHW-
        or channels-last-contiguous): no bool tensor."""
        if not _compiled_takes(t, kernels):
            return cls(t > 0, t, inside, outside, kernels)
        flat, cl = _in_memory_order(t)
        return cls._from_bits(kernels.positive_bits(flat), t, inside, outside, kernels, cl)

    @classmethod
    def ranges(cls, t: torch.Tensor, lo: float, hi: float, above: bool, kernels: Any = None
               ) -> tuple[_Mask, _Mask | None]:
        """What a clamp to ``[lo, hi]`` (Hardtanh, ReLU6) keeps of its input ``t``: the mask ``lo < t < hi``
        (rebuilt as the mid-point inside, above ``hi`` outside, so the backward takes the same branch) and, if
        ``above``, the mask ``t >= hi`` (to rebuild the clamp's output); one compiled pass where the kernels take
        ``t``."""
        if not _compiled_takes(t, kernels):
            return (cls((t > lo) & (t < hi), t, (lo + hi) / 2, hi + 1.0, kernels),
                    cls(t >= hi, t, 1.0, 0.0) if above else None)
        flat, cl = _in_memory_order(t)
        inside, top = kernels.range_bits(flat, lo, hi, above)
        return (cls._from_bits(inside, t, (lo + hi) / 2, hi + 1.0, kernels, cl),
                None if top is None else cls._from_bits(top, t, 1.0, 0.0, kernels, cl))

    @classmethod
    def _from_bits(cls, bits: torch.Tensor, like: torch.Tensor, inside: float, outside: float, kernels: Any,
                   channels_last: bool) -> _Mask:
        m = cls.__new__(cls)
        m.kernels, m.channels_last, m.bits = kernels, channels_last, bits
        m.shape, m.stride, m.dtype = like.shape, like.stride(), like.dtype
        m.inside, m.outside = inside, outside
        return m

    def tensors(self) -> list[torch.Tensor]:
        return [self.bits]

    def bool_mask(self) -> torch.Tensor:
        m = _unpack_bool(self.bits, _numel(self.shape))
        if self.channels_last:
            n, c, h, w = self.shape
            return m.view(n, h, w, c).permute(0, 3, 1, 2)
        return m.view(self.shape)

    def unpack(self) -> torch.Tensor:
        if self.kernels is not None and self.dtype in (torch.float32, torch.bfloat16):  # one compiled pass
            t = self.kernels.mask_values(self.bits, tuple(self.shape), self.dtype, self.inside, self.outside,
                                         self.channels_last)
            return restride(t, self.stride)
        m = self.bool_mask()
        if self.dtype == torch.bool:
            return restride(m, self.stride)
        t = m.to(self.dtype)  # inside where set, outside where clear, by one multiply-add (no where)
        if self.inside != 1.0 or self.outside != 0.0:
            t.mul_(self.inside - self.outside).add_(self.outside)
        return restride(t, self.stride)


def _is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels-last (and not also NCHW-contiguous)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _in_memory_order(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``t`` flattened in its memory order if channels-last (NHWC, a view), else in its logical (NCHW) order, and
    whether it was channels-last."""
    cl = _is_channels_last(t)
    return (t.permute(0, 2, 3, 1) if cl else t).reshape(-1), cl


def _compiled_takes(t: torch.Tensor, kernels: Any) -> bool:
    """The compiled mask and code passes take ``t``: CPU fp32/bf16, NCHW- or channels-last-contiguous."""
    return (kernels is not None and t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16)
            and (t.is_contiguous() or _is_channels_last(t)))


class _ShapeOnly:
    """A tensor whose op reads only its sizes and layout in backward (pooling inputs): nothing is kept."""

    __slots__ = ("shape", "stride", "dtype", "device")

    def __init__(self, t: torch.Tensor):
        self.shape, self.stride, self.dtype, self.device = t.shape, t.stride(), t.dtype, t.device

    def tensors(self) -> list[torch.Tensor]:
        return []

    def unpack(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)


class _NarrowIndex:
    """int64 indices (max-pool) kept as int16 or int32 when their values fit; rebuilt exactly."""

    __slots__ = ("values",)

    def __init__(self, t: torch.Tensor, dtype: torch.dtype):
        self.values = t.to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.values]

    def unpack(self) -> torch.Tensor:
        return self.values.to(torch.int64)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _OpTracker(TorchFunctionMode):
    """Records the torch function being called during the forward (innermost first), for the pack hook, and lets
    the codec see a BN's output and a ReLU of it (:mod:`leanprop.ops.bn_units`)."""

    def __init__(self, codec: SavedTensorCodec):
        super().__init__()
        self.codec = codec
        self.stack: list[tuple[str, str, tuple, dict]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():  # traced into a graph, whose saves reach the codec without their op
            if op_kind(func) in _EAGER_KINDS and torch.is_grad_enabled():
                return _call_eagerly(self, func, args, kwargs)
            return func(*args, **kwargs)
        return self.call(func, args, kwargs)

    def call(self, func, args: tuple, kwargs: dict):
        """``func(*args, **kwargs)`` seen by the codec: its saves are kept by the storage policy of its kind."""
        entry = (op_kind(func), getattr(func, "__name__", ""), args, kwargs)
        self.stack.append(entry)
        try:
            pre = self.codec._before(func, entry)
            out = func(*args, **kwargs)
            if pre is not None:
                self.codec._after(entry, pre, out)
            return out
        finally:
            self.stack.pop()


#: kinds whose functional calls (``F.relu``, ``torch.relu_``, ``F.relu6``...) leave a compiled graph to run eagerly
_EAGER_KINDS = frozenset({"relu", "hardtanh", "leaky_relu"})


@torch.compiler.disable
def _call_eagerly(tracker: _OpTracker, func: Any, args: tuple, kwargs: dict) -> Any:
    """A ReLU-family call met inside a compiled graph, run eagerly between graphs (one graph break), so that its
    backward keeps the exact 1-bit mask as in eager mode instead of reading it off what the graph saves (or
    recomputes from another tensor's codes)."""
    return tracker.call(func, args, kwargs)


def _hardtanh_range(args: tuple, kwargs: dict, name: str) -> tuple[float, float]:
    if name == "relu6":
        return 0.0, 6.0
    lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return float(lo), float(hi)


_STATS = ("coded", "kept", "param_copies", "masks", "shape_only", "indices", "derived")


class SavedTensorCodec:
    """Pack/unpack hooks that compress float tensors saved for backward (see the module docstring).

    ``bits=None`` keeps every tensor as it is (an auditing pass-through). ``recording(ledger)`` reports each
    tensor actually kept to ``ledger.record(tensor, kind)`` (kind None: the ledger classifies it).
    """

    def __init__(self, bits: int | None = 8, min_bytes: int = 65536, *, by_op: bool = False,
                 stochastic: bool = False, seed: int = 0, policy: Mapping[str, int] | None = None,
                 kernels: Any = None):
        if bits not in (None, 2, 4, 8, 32):
            raise ValueError(f"codec bits must be 2, 4, 8, 32 or None, got {bits!r}")
        unknown = sorted(set(policy or {}) - set(OP_KINDS) - {"other"})
        if unknown:
            raise ValueError(f"codec policy: unknown op kind(s) {unknown}; use {', '.join([*OP_KINDS, 'other'])}")
        bad = {k: v for k, v in (policy or {}).items() if v not in (2, 4, 8, 32)}
        if bad:
            raise ValueError(f"codec policy: bits must be 2, 4, 8 or 32, got {bad}")
        self.bits = bits
        self.min_bytes = int(min_bytes)
        self.kernels = kernels  # the compiled group coder (leanprop.ops.kernels), or None for torch ops
        self.by_op = bool(by_op)
        self.policy = dict(policy or {})
        self.stochastic = bool(stochastic)
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._ledger: Any = None
        self._seen: dict[tuple, Any] = {}
        self._params: set[int] = set()
        self._by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, bool]]] = {}
        self._depth = 0
        self._tracker: _OpTracker | None = None
        self._bn_pending: list[BNRecord] = []
        self._bn_out: dict[tuple, tuple[BNRecord, Any]] = {}  # key of a BN output -> its record (while alive)
        self._derived: dict[tuple, ReluOfBN] = {}  # key of a ReLU(BN) output -> how to rebuild it
        self._kept: dict[tuple, tuple[Any, Any]] = {}  # key of a float tensor kept as codes/recipe -> (it, weakref)
        self._bn_view: dict[tuple, tuple[Any, Any]] = {}  # (ptr, version, numel) of a contiguous norm output
        self._last_mask: _Mask | None = None
        self._last_above: _Mask | None = None
        self._unary_input: tuple | None = None  # (recipe, shape, name) of the activation being called
        #: counts of the last forward: ``coded`` tensors, ``kept`` (passed through: small, integer, parameters),
        #: ``param_copies`` (copies of a parameter, e.g. its autocast cast, kept as a reference to it), ``masks``
        #: (1-bit), ``shape_only`` (nothing kept), ``indices`` (narrowed)
        self.stats: dict[str, int] = dict.fromkeys(_STATS, 0)

    # -- stochastic rounding --------------------------------------------------------------------------
    #: Stochastic rounding draws from a generator reseeded at every forward with ``(seed, step)``: a forward's
    #: draws depend only on the training step and the order the forward codes its tensors in -- not on how many
    #: forwards ran before (audits, compilation) -- so a resumed run, and an eager and a compiled model coding the
    #: same tensors, draw the same numbers. The owner advances :attr:`step` once per optimizer step.
    step: int = 0

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if not self.stochastic:
            return None
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
            g.manual_seed(self._round_seed())
        return g

    def _round_seed(self) -> int:
        return (self.seed * 1_000_003 + self.step) % (2**63 - 1)

    def rng_state(self) -> dict[str, int]:
        """What the stochastic rounding depends on besides the data (a checkpoint keeps it)."""
        return {"seed": self.seed, "step": self.step}

    def set_rng_state(self, state: Mapping[str, int]) -> None:
        self.seed, self.step = int(state.get("seed", self.seed)), int(state.get("step", self.step))

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
            self.stats = dict.fromkeys(_STATS, 0)
            for g in self._generators.values():
                g.manual_seed(self._round_seed())
            self._index_parameters(module)
            self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
            self._ctx.__enter__()
            if self.by_op:
                self._bn_out, self._derived, self._bn_pending, self._kept, self._bn_view = {}, {}, [], {}, {}
                self._tracker = _OpTracker(self)
                self._tracker.__enter__()
        self._depth += 1

    @torch.compiler.disable
    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            if self._tracker is not None:
                self._tracker.__exit__(None, None, None)
                self._tracker = None
            self._bn_out, self._derived, self._bn_pending, self._kept, self._bn_view = {}, {}, [], {}, {}
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

    def _current_op(self) -> tuple[str, str, tuple, dict]:
        if self._tracker is None or not self._tracker.stack:
            return "other", "", (), {}
        return self._tracker.stack[-1]

    # -- virtual BN->ReLU units (leanprop.ops.bn_units) ----------------------------------------------------
    def _bn_bits(self, per_channel: int | None = None) -> int | None:
        """Code width of a BN input; ``per_channel``: the elements each channel's statistics reduce over. Unless the
        policy names ``batch_norm``, a BN reducing over fewer than one group (``GROUP``) per channel -- the last
        stages of a small input or batch -- keeps at least 8 bits: its backward averages the coding error of
        ``xhat`` over that few elements (a tensor under ``GROUP * C`` elements, so the extra bytes are few)."""
        bits = self.policy.get("batch_norm", self.bits)
        if bits is None or bits >= 32:
            return None
        if per_channel is not None and per_channel < GROUP and "batch_norm" not in self.policy:
            return max(bits, 8)
        return bits

    def _norm_bits(self) -> int | None:
        bits = self.policy.get("norm", self.bits)
        return None if bits is None or bits >= 32 else bits

    def _affine_packer(self, bits: int) -> Any:
        """The compiled xhat coder for a BN input it can take (CPU fp32/bf16, NCHW- or channels-last-contiguous, whole
        groups), else None."""
        kernels = self.kernels
        if kernels is None:
            return None

        def pack(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor) -> Any:
            if x.dim() < 3 or x.numel() % GROUP or not _compiled_takes(x, kernels):
                return None
            g = self._generator(x.device)
            seeds = None if g is None else torch.randint(-(2**63), 2**63 - 1, (x.numel() // GROUP,), generator=g,
                                                         dtype=torch.int64)
            return AffineCodes(kernels, x, mean, invstd, bits, GROUP, seeds)

        return pack

    @torch.compiler.disable  # bookkeeping, called eagerly only: never a graph of its own
    def _before(self, func: Any, entry: tuple) -> Any:
        """Called before a torch function runs in the forward: a BN call or a ReLU of a BN output to follow."""
        kind, _, args, kwargs = entry
        if kind == "batch_norm" and func is F.batch_norm and self._bn_bits() is not None and torch.is_grad_enabled():
            x = args[0] if args else kwargs.get("input")
            training = kwargs.get("training", args[5] if len(args) > 5 else False)
            if not (training and isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2):
                return None
            weight = kwargs.get("weight", args[3] if len(args) > 3 else None)
            bias = kwargs.get("bias", args[4] if len(args) > 4 else None)
            skip = {id(a) for a in (args[1:3] if len(args) > 2 else ()) if isinstance(a, torch.Tensor)}
            skip |= {id(kwargs[k]) for k in ("running_mean", "running_var") if kwargs.get(k) is not None}
            record = BNRecord(weight, bias, float(kwargs.get("eps", args[7] if len(args) > 7 else 1e-5)), skip)
            self._bn_pending.append(record)
            return record
        if kind == "norm" and func is F.layer_norm and self._norm_bits() is not None and torch.is_grad_enabled():
            x = args[0] if args else kwargs.get("input")
            shape = kwargs.get("normalized_shape", args[1] if len(args) > 1 else None)
            if not (isinstance(x, torch.Tensor) and x.is_floating_point() and shape is not None):
                return None
            weight = kwargs.get("weight", args[2] if len(args) > 2 else None)
            bias = kwargs.get("bias", args[3] if len(args) > 3 else None)
            dims = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
            record = LNRecord(weight, bias, float(kwargs.get("eps", args[4] if len(args) > 4 else 1e-5)),
                              normalized_dims=dims)
            self._bn_pending.append(record)
            return record
        if kind in ("relu", "hardtanh") and self._bn_out and args and isinstance(args[0], torch.Tensor):
            hit = self._bn_out.get(tensor_key(args[0]))
            if hit is not None and hit[1]() is args[0]:
                self._last_mask, self._last_above = None, None
                return hit[0]
        if entry[1] in _UNARY and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            # the input's recipe now (an in-place call changes its version), else after the call, which may pack it
            ra = self._recipe_of(args[0])
            self._unary_input = (ra, tuple(args[0].shape), entry[1]) if ra is not None else None
            return (_UNARY_PENDING, ra)
        if entry[1] in _ADD_NAMES and self._bn_out and len(args) >= 2 and kwargs.get("alpha", 1) == 1:
            a, b = args[0], args[1]
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
                ra, rb = self._recipe_of(a), self._recipe_of(b)
                if ra is not None and rb is not None and (isinstance(ra, BNRecord) or isinstance(rb, BNRecord)):
                    return SumRecipe(ra, rb)
        return None

    def _recipe_of(self, t: torch.Tensor) -> Any:
        """How to rebuild ``t`` from what the codec keeps anyway: a BN output's record or ``t``'s own codes/recipe."""
        key = tensor_key(t)
        hit = self._bn_out.get(key)
        if hit is not None and hit[1]() is t:
            return hit[0]
        kept = self._kept.get(key)
        if kept is not None and kept[1]() is t:
            return SavedValue(kept[0])
        return None

    @torch.compiler.disable  # bookkeeping, called eagerly only: never a graph of its own
    def _after(self, entry: tuple, record: BNRecord, out: Any) -> None:
        kind = entry[0]
        if kind in ("batch_norm", "norm") and isinstance(record, BNRecord):
            self._bn_pending.remove(record)
            per_channel = out.numel() // max(1, out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() > 1 \
                else None
            bits = self._bn_bits(per_channel) if kind == "batch_norm" else self._norm_bits()
            if isinstance(out, torch.Tensor) and record.finalize(
                    lambda xhat: _Packed(xhat, bits, self._generator(xhat.device), self.kernels),
                    self._affine_packer(bits) if kind == "batch_norm" else None):
                self.stats["coded"] += 1
                for part in record.codes.tensors():
                    self._record(part, "codes" if part.dtype == torch.uint8 else None)
                self._rebuildable(out, record)
        elif kind == "relu" and isinstance(out, torch.Tensor) and self._last_mask is not None:
            self._derived[tensor_key(out)] = ReluOfBN(record, self._last_mask, out)
        elif kind == "hardtanh" and isinstance(out, torch.Tensor) and self._last_above is not None:
            lo, hi = _hardtanh_range(entry[2], entry[3], entry[1])
            self._derived[tensor_key(out)] = ReluOfBN(record, self._last_mask, out, (lo, hi, self._last_above))
        elif isinstance(record, tuple) and record[0] is _UNARY_PENDING:
            self._unary_input = None
            ra = record[1] if record[1] is not None else self._recipe_of(entry[2][0])
            ra = ra if isinstance(out, torch.Tensor) else None
            if ra is not None:
                self._rebuildable(out, UnaryRecipe(_UNARY[entry[1]], ra,
                                                   {k: v for k, v in entry[3].items() if k == "approximate"}))
        elif isinstance(record, SumRecipe) and isinstance(out, torch.Tensor):
            self._rebuildable(out, record)

    def _rebuildable(self, out: torch.Tensor, recipe: Any) -> None:
        """``out`` can be rebuilt by ``recipe``: for an op that keeps it, or a contiguous view of it (a linear
        layer's 2-D input is the same value), while it is alive."""
        self._bn_out[tensor_key(out)] = (recipe, weakref.ref(out))
        if out.is_contiguous():
            self._bn_view[(out.data_ptr(), out._version, out.numel())] = (recipe, weakref.ref(out))

    def _bn_saved(self, t: torch.Tensor, record: BNRecord) -> Any:
        """What a BN call under way keeps of ``t``: its input as the record's codes; the statistics, running buffers
        and affine parameters exactly as they are (the backward and the codes' rebuild read them)."""
        if t.dim() >= 2 and record.x is None and t.is_floating_point() and id(t) not in record.skip \
                and not isinstance(t, nn.Parameter) and t.data_ptr() not in self._params:
            record.x = t
            return BNInput(record, t)
        if t.is_floating_point() and id(t) not in record.skip and not isinstance(t, nn.Parameter) \
                and t.data_ptr() not in self._params and (t.dim() == 1 or isinstance(record, LNRecord)):
            record.stats.append(t)
        return self._keep(t)

    def _by_op(self, t: torch.Tensor, kind: str, name: str, args: tuple, kwargs: dict) -> Any:
        """The op-specific representation of ``t`` (1-bit mask, shape only, narrowed indices), or None."""
        if t.dtype == torch.bool:
            return _Mask(t, t, 1.0, 0.0)
        if not t.is_floating_point():
            if kind == "max_pool" and t.dtype == torch.int64 and t.numel():
                top = int(t.max())
                dtype = torch.int16 if top < 2**15 else torch.int32 if top < 2**31 else None
                return _NarrowIndex(t, dtype) if dtype is not None else None
            return None
        if kind in ("max_pool", "avg_pool"):
            return _ShapeOnly(t)
        if kind == "dropout" and t.numel():  # the scaled keep-mask {0, 1/(1-p)} dropout multiplies by (CPU)
            scale = t.detach().amax()
            keep = t != 0
            if bool(((t == scale) | ~keep).all()):
                return _Mask(keep, t, float(scale), 0.0, self.kernels)
            return None
        if kind == "relu":  # ReLU keeps its result: backward reads result > 0
            self._last_mask = _Mask.positive(t, 1.0, 0.0, self.kernels)
            return self._last_mask
        if kind == "leaky_relu":  # backward reads x > 0 (result > 0 for the in-place form)
            return _Mask.positive(t, 1.0, -1.0, self.kernels)
        if kind == "hardtanh":  # backward reads min < x < max
            lo, hi = _hardtanh_range(args, kwargs, name)
            edge = bool(self._bn_out and args and args[0] is t)  # of a BN output: the top edge too, to rebuild it
            self._last_mask, above = _Mask.ranges(t, lo, hi, edge, self.kernels)
            if edge:
                self._last_above = above
                self._record(above.bits, "mask")
            return self._last_mask
        return None

    @torch.compiler.disable  # bookkeeping, called eagerly only: never a graph of its own
    def pack(self, t: torch.Tensor) -> Any:
        if self.by_op:
            kind, name, args, kwargs = self._current_op()
            if self._derived and t.is_floating_point():
                derived = self._derived.get(tensor_key(t))
                if derived is not None and derived.alive() is not None:
                    self.stats["derived"] += 1
                    self._kept[tensor_key(t)] = (derived, weakref.ref(t))
                    return derived
            if kind in ("batch_norm", "norm") and self._bn_pending:
                saved = self._bn_saved(t, self._bn_pending[-1])
                if saved is not None:
                    return saved
            if kind == "smooth" and self._unary_input is not None and t.is_floating_point() \
                    and tuple(t.shape) == self._unary_input[1]:
                # what the activation keeps of a rebuildable input: the input itself (or the copy an in-place call
                # keeps), or its result (sigmoid, tanh): rebuilt, no bytes
                ra, _, fname = self._unary_input
                value = RecipeValue(UnaryRecipe(_UNARY[fname], ra, {}) if fname in _SAVES_RESULT else ra, t)
                self.stats["derived"] += 1
                self._kept[tensor_key(t)] = (value, weakref.ref(t))
                return value
            if self._bn_out and t.is_floating_point() and kind not in ("relu", "hardtanh", "leaky_relu"):
                hit = self._bn_out.get(tensor_key(t))  # a BN output (or a sum of one) saved as it is: a recipe
                if hit is None and t.is_contiguous():
                    hit = self._bn_view.get((t.data_ptr(), t._version, t.numel()))
                    hit = hit if hit is not None and hit[1]() is not None else None
                elif hit is not None and hit[1]() is not t:
                    hit = None
                if hit is not None:
                    self.stats["derived"] += 1
                    value = RecipeValue(hit[0], t)
                    self._kept[tensor_key(t)] = (value, weakref.ref(t))
                    return value
            if not (t.is_floating_point() and (isinstance(t, nn.Parameter) or t.data_ptr() in self._params)):
                special = self._by_op(t, kind, name, args, kwargs)
                if special is not None:
                    self.stats[{_Mask: "masks", _ShapeOnly: "shape_only", _NarrowIndex: "indices"}[type(special)]] += 1
                    for part in special.tensors():
                        self._record(part, "mask" if isinstance(special, _Mask) else None)
                    return special
        else:
            kind, name = "other", None
        bits = self.policy.get(kind, self.bits)
        if (bits is None or bits >= 32 or not t.is_floating_point() or isinstance(t, nn.Parameter)
                or t.data_ptr() in self._params):
            return self._keep(t)
        ref = self._parameter_of(t) if t.dim() >= 2 else None
        if ref is not None:
            self.stats["param_copies"] += 1
            self._record(ref.param, None)
            return ref
        # 1-D tensors are not exempt: SWAT's packed X_s values (the kept activations) are 1-D and become codes;
        # a view that leaves gaps (a chunk / split / slice of the channels) is coded too, and rebuilt with its
        # strides; one whose elements overlap (an expanded view) is kept: no tensor of its strides could be written
        if t.numel() * t.element_size() < self.min_bytes or not _non_overlapping(t):
            return self._keep(t)
        key = (t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, bits)
        hit = self._seen.get(key)
        # a live weak reference proves the memory still belongs to the tensor packed under this key
        packed = hit[0] if hit is not None and hit[1]() is not None else None
        if packed is None:
            # an unknown op (a compiled graph's save) may read a ReLU mask off the codes: keep its zeros exact
            packed = _Packed(t, bits, self._generator(t.device), self.kernels, exact_zero=name == "")
            self.stats["coded"] += 1
            self._seen[key] = (packed, weakref.ref(t))
            if self.by_op:
                self._kept[tensor_key(t)] = (packed, weakref.ref(t))
            for part in packed.tensors():
                self._record(part, "codes" if part.dtype == torch.uint8 else None)
        return packed

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        self.stats["kept"] += 1
        self._record(t, None)
        return t

    @staticmethod
    @torch.compiler.disable
    def unpack(obj: Any) -> torch.Tensor:
        return obj.unpack() if isinstance(obj, (_Packed, _ParamRef, _Mask, _ShapeOnly, _NarrowIndex, BNInput,
                                                ReluOfBN, RecipeValue)) else obj


def _non_overlapping(t: torch.Tensor) -> bool:
    """Whether no two elements of ``t`` share memory (dense, or a view with gaps; not an expanded view): with the
    dimensions in increasing stride, each stride reaches past everything the smaller ones span."""
    extent = 1
    for st, n in sorted((st, n) for n, st in zip(t.shape, t.stride(), strict=True) if n > 1):
        if st < extent:
            return False
        extent += (n - 1) * st
    return True


def find_codec(model: nn.Module) -> SavedTensorCodec | None:
    """The codec ``convert_`` attached to ``model``'s forward, if any (also through ``torch.compile``'s wrapper)."""
    model = getattr(model, "_orig_mod", model)
    for hook in model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, SavedTensorCodec):
            return owner
    return None
