"""Virtual BN->ReLU units of the storage policy: BLPA's saving on any model, found from the computation itself.

BLPA keeps, of a BatchNorm -> ReLU pair, only K-bit codes of the normalised BN output and the exact ReLU mask
(Chakrabarti & Moseley 2019, §3): the BN backward needs ``xhat = (x - mean) * invstd`` and the next layer needs
``z = ReLU(gamma * xhat + beta)``, both rebuilt from the codes. :class:`~leanprop.ops.codec.SavedTensorCodec`
(``by_op=True``) does the same for every ``F.batch_norm`` call of a training forward -- whatever module or
functional call made it -- and for every ``relu`` applied to such a BN's output:

* the BN's saved input becomes :class:`BNInput`: codes of ``xhat`` (per group of 256, stochastic rounding),
  rebuilt as ``xhat~ / invstd + mean`` with the batch statistics BN keeps anyway;
* the ReLU keeps its 1-bit mask as before, and any op that saves the ReLU's output (the next conv, a projection
  shortcut, a pooling layer...) keeps :class:`ReluOfBN`: nothing but references, rebuilt in backward as
  ``where(mask, gamma * xhat~ + beta, 0)`` -- one set of codes for the pair, as in BLPA's fused unit, without
  swapping any module (``F.relu`` in a forward and one ReLU module used twice are seen the same way);
* a post-activation block's ``ReLU(BN(x) + identity)`` is rebuilt the same way when the identity is itself kept
  (codes, or such a recipe): :class:`SumRecipe` adds the two rebuilt terms, so the block output costs no bytes
  beyond its 1-bit mask;
* ReLU6 of a BN output is rebuilt with two 1-bit masks (inside the range, at the top), and any other op that saves
  a BN output itself (the input SiLU, GELU or a plain conv keeps) keeps :class:`RecipeValue`: no bytes;
* ``F.layer_norm`` (:class:`LNRecord`) the same way: its input as codes of ``xhat`` with the per-position statistics
  LayerNorm keeps, its output -- e.g. the input of the pointwise linear layer after it -- as a recipe;
* a smooth activation of a kept or rebuildable input (GELU, SiLU, sigmoid; :class:`UnaryRecipe`): its output, saved
  by the next layer, is rebuilt by applying the activation to the rebuilt input.

The affine parameters are read again in backward (an in-place change before backward is an error, as for any
saved tensor). docs/methods/blpa.md, "Storage policy".
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from leanprop.ops.packing import restride

__all__ = ["AffineCodes", "BNRecord", "LNRecord", "UnaryRecipe", "BNInput", "ReluOfBN", "RecipeValue", "SumRecipe",
           "SavedValue", "tensor_key"]


def tensor_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's current value: storage address, version, shape, strides and dtype."""
    return (t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype)


def _per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (C,) vector shaped to broadcast over ``like``'s channel dimension (dim 1)."""
    return v.reshape([1, -1] + [1] * (like.dim() - 2))


def _check_version(p: torch.Tensor | None, version: int | None) -> None:
    if p is not None and p._version != version:
        raise RuntimeError(f"a BatchNorm parameter of shape {tuple(p.shape)} was modified in place before backward "
                           f"(version {version}, now {p._version}); update parameters only after backward")


class AffineCodes:
    """Group codes of ``xhat`` made straight from a CPU fp32/bf16 BN input (NCHW- or channels-last-contiguous) by the
    compiled kernels (no ``xhat`` tensor), decoded straight into ``x``, ``gamma * xhat + beta`` or ``ReLU`` of it
    (:meth:`decode`), in the input's memory layout."""

    __slots__ = ("kernels", "packed", "lo", "step", "bits", "group", "shape", "channels_last")

    def __init__(self, kernels: Any, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, bits: int, group: int,
                 seeds: torch.Tensor | None):
        self.kernels, self.bits, self.group, self.shape = kernels, bits, group, tuple(x.shape)
        self.channels_last = not x.is_contiguous()  # the kernels' gate admits only the two layouts
        self.packed, self.lo, self.step = kernels.group_encode_affine(x, mean.contiguous(), invstd.contiguous(), bits,
                                                                      group, seeds)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.lo, self.step]

    def decode(self, scale: torch.Tensor | None, shift: torch.Tensor | None, mask: Any = None,
               addend: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
               clamp: tuple | None = None) -> torch.Tensor:
        """``(xhat * scale + shift (+ addend))``, zero where ``mask`` (packed bits in the same memory order) is
        clear -- or, with ``clamp = (lo, hi, above bits)``, ``hi`` where ``above`` is set and ``lo`` elsewhere --
        as a ``dtype`` tensor in the encoded layout."""
        return self.kernels.group_decode_affine(self.packed, self.lo, self.step, self.bits, self.group, self.shape,
                                                scale, shift, mask, addend, dtype, self.channels_last, clamp)

    def unpack(self) -> torch.Tensor:
        return self.decode(None, None)


class BNRecord:
    """One training-mode BN call: its input while the call runs, then the codes of ``xhat`` and the statistics."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
                 skip: set[int] | None = None, normalized_dims: int = 1):
        self.weight, self.bias = weight, bias
        self.eps = eps
        self.skip = skip or set()  # ids of the call's running-statistics buffers (kept as they are)
        self.normalized_dims = normalized_dims  # LayerNorm: how many trailing dimensions it normalises
        self.versions = (None if weight is None else weight._version, None if bias is None else bias._version)
        self.x: torch.Tensor | None = None  # only until finalize
        self.stats: list[torch.Tensor] = []  # save_mean, save_invstd, as the BN node saves them
        self.codes: Any = None
        self.mean: torch.Tensor | None = None
        self.invstd: torch.Tensor | None = None

    def finalize(self, pack_xhat, pack_affine: Any = None) -> bool:
        """Code ``xhat`` of the input seen during the call; False when the call saved no input (nothing to do).
        ``pack_affine(x, mean, invstd)``: the compiled path (:class:`AffineCodes`), or None where it does not apply."""
        x = self.x
        if x is None:
            return False
        if len(self.stats) == 2 and all(s.numel() == x.shape[1] for s in self.stats):
            mean, invstd = (s.detach().float() for s in self.stats)
        else:  # not the native kernel's saved statistics: compute them
            dims = [d for d in range(x.dim()) if d != 1]
            var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=0)
            invstd = torch.rsqrt(var + self.eps)
        self.mean, self.invstd = mean, invstd
        self.codes = pack_affine(x.detach(), mean, invstd) if pack_affine is not None else None
        if self.codes is None:
            xhat = (x.detach().float() - _per_channel(mean, x)) * _per_channel(invstd, x)
            self.codes = pack_xhat(xhat)
        self.x = None
        return True

    def xhat(self) -> torch.Tensor:
        return self.codes.unpack()

    def x_from(self, xhat: torch.Tensor) -> torch.Tensor:
        """The input rebuilt from ``xhat``: ``xhat / invstd + mean``."""
        return xhat / _per_channel(self.invstd, xhat) + _per_channel(self.mean, xhat)

    def rebuilt_input(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The rebuilt input (one compiled pass, straight to ``dtype``, where the codes allow)."""
        if isinstance(self.codes, AffineCodes) and dtype in (torch.float32, torch.bfloat16):
            return self.codes.decode(1.0 / self.invstd, self.mean, dtype=dtype)
        return self.x_from(self.xhat()).to(dtype)

    def affine(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        _check_version(self.weight, self.versions[0])
        _check_version(self.bias, self.versions[1])
        w = None if self.weight is None else self.weight.detach().float().contiguous()
        b = None if self.bias is None else self.bias.detach().float().contiguous()
        return w, b

    def y(self, like: torch.Tensor) -> torch.Tensor:
        """``gamma * xhat~ + beta`` in float32, shaped like the BN output."""
        if isinstance(self.codes, AffineCodes):
            return self.codes.decode(*self.affine())
        _check_version(self.weight, self.versions[0])
        _check_version(self.bias, self.versions[1])
        y = self.xhat()
        if self.weight is not None:
            y = y * _per_channel(self.weight.detach().float(), like)
        if self.bias is not None:
            y = y + _per_channel(self.bias.detach().float(), like)
        return y


class LNRecord(BNRecord):
    """One ``F.layer_norm`` call: the same as :class:`BNRecord`, normalised over the last dimensions, with the
    per-position statistics the LayerNorm node keeps (shaped to broadcast) and the affine over those dimensions."""

    def finalize(self, pack_xhat, pack_affine: Any = None) -> bool:
        x = self.x
        if x is None:
            return False
        k = self.normalized_dims
        if len(self.stats) == 2 and all(tuple(s.shape) == tuple(x.shape[:-k]) + (1,) * k for s in self.stats):
            mean, rstd = (s.detach().float() for s in self.stats)
        else:
            dims = list(range(x.dim() - k, x.dim()))
            var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=0, keepdim=True)
            rstd = torch.rsqrt(var + self.eps)
        self.mean, self.invstd = mean, rstd
        self.codes = pack_xhat((x.detach().float() - mean) * rstd)
        self.x = None
        return True

    def x_from(self, xhat: torch.Tensor) -> torch.Tensor:
        return xhat / self.invstd + self.mean

    def rebuilt_input(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.x_from(self.xhat()).to(dtype)

    def y(self, like: torch.Tensor) -> torch.Tensor:
        _check_version(self.weight, self.versions[0])
        _check_version(self.bias, self.versions[1])
        y = self.xhat()
        if self.weight is not None:
            y = y * self.weight.detach().float()
        if self.bias is not None:
            y = y + self.bias.detach().float()
        return y


class SavedValue:
    """A tensor the codec keeps anyway (codes or a rebuild recipe), read as a float32 term of a sum."""

    def __init__(self, saved: Any):
        self.saved = saved

    def y(self, like: torch.Tensor) -> torch.Tensor:
        return self.saved.unpack().float()


class SumRecipe:
    """``a + b`` of two rebuildable terms (a BN output plus an identity shortcut: BN -> add -> ReLU)."""

    def __init__(self, a: Any, b: Any):
        self.a, self.b = a, b

    def y(self, like: torch.Tensor) -> torch.Tensor:
        return self.a.y(like) + self.b.y(like)


class BNInput:
    """A BN's saved input, kept as its record's codes of ``xhat`` (filled in when the BN call returns)."""

    __slots__ = ("record", "shape", "stride", "dtype")

    def __init__(self, record: BNRecord, t: torch.Tensor):
        self.record = record
        self.shape, self.stride, self.dtype = t.shape, t.stride(), t.dtype

    def tensors(self) -> list[torch.Tensor]:
        return self.record.codes.tensors() if self.record.codes is not None else []

    def unpack(self) -> torch.Tensor:
        return restride(self.record.rebuilt_input(self.dtype), self.stride)


class RecipeValue:
    """A saved tensor that is itself a rebuildable value (a BN output, or a sum of one), e.g. the input SiLU keeps."""

    __slots__ = ("record", "shape", "stride", "dtype", "alive")

    def __init__(self, record: Any, t: torch.Tensor):
        self.record = record
        self.shape, self.stride, self.dtype = t.shape, t.stride(), t.dtype
        self.alive = weakref.ref(t)

    def tensors(self) -> list[torch.Tensor]:
        return []

    def unpack(self) -> torch.Tensor:
        like = torch.empty(0).new_empty(self.shape, device="meta")
        y = self.record.y(like)
        if tuple(y.shape) != tuple(self.shape):  # a contiguous view of the value (e.g. a linear layer's 2-D input)
            y = y.reshape(self.shape)
        return restride(y.to(self.dtype), self.stride)


class UnaryRecipe:
    """``f(a)`` of a rebuildable ``a`` for an elementwise ``f`` (GELU, SiLU, sigmoid...): the next layer's saved
    input costs nothing when the activation's own input is kept."""

    def __init__(self, func: Any, a: Any, kwargs: dict):
        self.func, self.a, self.kwargs = func, a, kwargs

    def y(self, like: torch.Tensor) -> torch.Tensor:
        return self.func(self.a.y(like), **self.kwargs)


class ReluOfBN:
    """A saved ``ReLU(BN(x))`` (or ``clamp(BN(x), lo, hi)``, ReLU6): nothing kept but the BN's record and the
    activation's 1-bit mask(s)."""

    __slots__ = ("record", "mask", "shape", "stride", "dtype", "alive", "clamp")

    def __init__(self, record: BNRecord, mask: Any, out: torch.Tensor, clamp: tuple | None = None):
        self.record, self.mask = record, mask
        self.shape, self.stride, self.dtype = out.shape, out.stride(), out.dtype
        self.alive = weakref.ref(out)
        self.clamp = clamp  # (lo, hi, mask of the elements at hi) for a clamp

    def tensors(self) -> list[torch.Tensor]:
        return []

    def _residual_level(self) -> tuple[BNRecord, Any] | None:
        """``(bn, identity)`` when this is ``ReLU(BN + identity)`` with compiled BN codes in the mask's layout."""
        r = self.record
        if self.clamp is not None or not isinstance(r, SumRecipe):
            return None
        for bn, other in ((r.a, r.b), (r.b, r.a)):
            if type(bn) is BNRecord and isinstance(bn.codes, AffineCodes) \
                    and bn.codes.channels_last == self.mask.channels_last:
                return bn, other
        return None

    def _residual_chain(self, bn: BNRecord, other: Any) -> tuple[list[tuple], Any] | None:
        """The run of post-activation block outputs below this one (each block's identity is the previous block's
        output), innermost level first, as :meth:`CKernels.group_decode_chain` levels, and the identity below the
        run; None when the identity is not such an output (then one level is all there is)."""
        levels = [(bn, self.mask)]
        node = getattr(other, "saved", None)
        while type(node) is ReluOfBN and node.dtype == torch.float32 and node.shape == self.shape \
                and node.stride == self.stride and node.mask.bits.device.type == "cpu":
            level = node._residual_level()
            if level is None or (level[0].codes.group, level[0].codes.shape) != (bn.codes.group, bn.codes.shape):
                break
            levels.append((level[0], node.mask))
            other = level[1]
            node = getattr(other, "saved", None)
        if len(levels) == 1:
            return None
        out = []
        for record, mask in reversed(levels):
            codes = record.codes
            out.append((codes.packed, codes.lo, codes.step, codes.bits, *record.affine(), mask.bits))
        return out, other

    def unpack(self) -> torch.Tensor:
        r = self.record
        fused = self.mask.bits.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16)
        if fused and type(r) is BNRecord and isinstance(r.codes, AffineCodes) \
                and r.codes.channels_last == self.mask.channels_last and (
                    self.clamp is None or self.clamp[2].channels_last == self.mask.channels_last):
            # ReLU(gamma * xhat + beta), or its clamp (ReLU6), in one compiled pass
            clamp = None if self.clamp is None else (float(self.clamp[0]), float(self.clamp[1]), self.clamp[2].bits)
            return restride(r.codes.decode(*r.affine(), self.mask.bits, dtype=self.dtype, clamp=clamp), self.stride)
        level = self._residual_level() if fused else None
        if level is not None:  # ReLU(BN + identity): plus the identity
            bn, other = level
            like = torch.empty(0).new_empty(self.shape, device="meta")
            chain = self._residual_chain(bn, other) if self.dtype == torch.float32 else None
            if chain:  # the identity is itself such an output, and so on: the whole run in one pass
                levels, other = chain
                base = other.y(like).reshape(self.shape)
                z = bn.codes.kernels.group_decode_chain(levels, bn.codes.group, bn.codes.shape, base,
                                                        bn.codes.channels_last)
            else:
                z = bn.codes.decode(*bn.affine(), self.mask.bits, other.y(like).reshape(self.shape),
                                    dtype=self.dtype)
            return restride(z, self.stride)
        like = torch.empty(0).new_empty(self.shape, device="meta")
        y = r.y(like)
        m = self.mask.bool_mask().view(self.shape)
        if self.clamp is None:
            z = y.mul_(m)  # y is a fresh tensor: zero where the ReLU was off
        else:
            lo, hi, above = self.clamp
            edge = torch.where(above.bool_mask().view(self.shape), torch.tensor(hi, dtype=y.dtype, device=y.device),
                               torch.tensor(lo, dtype=y.dtype, device=y.device))
            z = torch.where(m, y, edge)
        return restride(z.to(self.dtype), self.stride)
