"""Compressed storage of SWAT's saved tensors (real memory, not simulated; docs/methods/swat.md).

SWAT keeps ``X_s = TopK(X)`` and ``W_s = TopK(W)`` for backward. Stored dense, a 90 %-sparse ``X_s`` costs as
much as ``X``. Here a sparse tensor is kept as its non-zero values (in its own dtype, in memory order) plus
their positions, as whichever is smaller:

* a 1-bit mask: ``numel / 8`` bytes, or
* int32 indices: ``4 · nnz`` bytes (smaller below 1/32 ≈ 3.1 % density).

At density ``d`` and fp32 values that is ``32·d + 1`` bits per element with the mask (4.2 bits at 90 % sparsity,
7.6× less than fp32). The weights need no second copy at all: the backward rebuilds ``W_s`` from the dense
Parameter (which exists anyway) and a 1-bit mask of its kept entries. Restoring is exact: ``unpack(pack(t))``
equals ``t`` bit for bit, so gradients are those of the uncompressed SWAT Functions.

On CPU the mask and the compaction run in one compiled pass each (``swat_*`` in ``ops/csrc/kernels.c``,
the same build as BLPA's kernels); elsewhere, or without a C compiler, torch ops do the same (same layout).
The C kernels take only CPU tensors (:func:`_cpu_kernels_for`): a CUDA (or any non-CPU) tensor always takes the
torch ops. Packing on an accelerator costs one host sync per layer and step: the number of kept values, which
is the size of the saved values tensor (``nonzero_static`` then gathers them without a second sync).
Everything here runs eagerly under ``torch.compile`` (the sizes are data-dependent).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from leanprop.ops.packing import flat_memory_view, from_flat_memory, memory_format_of, pack_bits, unpack_bits
from leanprop.ops.sparsify import magnitude_mask, sparsify

__all__ = ["PackedSparse", "pack_sparse", "pack_above", "unpack_sparse", "pack_mask", "unpack_mask",
           "pack_weight_mask", "restore_sparse_weight", "THRESHOLD_ATTR"]


@functools.cache
def _kernels():
    from leanprop.ops.kernels import load_kernels

    return load_kernels(required=False)


def _cpu_kernels_for(t: Tensor, thr: Tensor | float | None = None):
    """The compiled packer for ``t`` (and a threshold ``thr``), or None: only for CPU fp32/bf16 tensors and a
    threshold that is a float or a CPU tensor, never for a tensor of another device."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16):
        return None
    if isinstance(thr, Tensor) and thr.device.type != "cpu":
        return None
    return _kernels()


@dataclass(frozen=True)
class PackedSparse:
    """What :func:`unpack_sparse` needs besides the two saved tensors (positions, values)."""

    shape: torch.Size
    memory_format: torch.memory_format
    numel: int
    indexed: bool  # positions are int32 indices (True) or a packed 1-bit mask (False)
    offsets: Tensor | None = None  # per-chunk value offsets of the compiled packer (mask form only)


def pack_mask(keep: Tensor) -> tuple[Tensor, tuple[torch.Size, torch.memory_format, int]]:
    """A boolean tensor as a packed 1-bit uint8 tensor (memory order) and what restores its layout."""
    flat = flat_memory_view(keep).to(torch.uint8)
    return pack_bits(flat, 1), (keep.shape, memory_format_of(keep), keep.numel())


def unpack_mask(bits: Tensor, meta: tuple[torch.Size, torch.memory_format, int]) -> Tensor:
    """Inverse of :func:`pack_mask` (a bool tensor of the original shape and memory format)."""
    shape, fmt, numel = meta
    return from_flat_memory(unpack_bits(bits, 1, numel).bool(), shape, fmt)


#: the attribute through which a ``W_s`` made by ``sparsify(W, t)`` tells :func:`pack_weight_mask` its threshold ``t``
THRESHOLD_ATTR = "_sparse_threshold"


def pack_weight_mask(weight_sparse: Tensor) -> tuple[Tensor, Any]:
    """What backward keeps of ``W_s`` besides the dense Parameter: the magnitude threshold that made it (a 0-d
    tensor, when ``W_s = sparsify(W, t)`` carries ``t`` as :data:`THRESHOLD_ATTR`: ``W_s`` is rebuilt exactly from
    the unchanged Parameter), else a 1-bit mask of its non-zeros (structured masks)."""
    thr = getattr(weight_sparse, THRESHOLD_ATTR, None)
    if thr is not None:
        return thr, "threshold"
    return pack_mask(weight_sparse != 0)


def restore_sparse_weight(weight: Tensor, bits: Tensor, meta: Any, dtype: torch.dtype) -> Tensor:
    """``W_s`` from the dense Parameter and what :func:`pack_weight_mask` kept, in ``dtype`` (exact: zeros stay zero
    under a cast, kept entries are the Parameter's)."""
    if meta == "threshold":
        return sparsify(weight.detach(), bits).to(dtype)
    return torch.where(unpack_mask(bits, meta), weight.detach(), 0).to(dtype)


def _kept_values_device(flat_t: Tensor, flat_k: Tensor) -> tuple[Tensor, Tensor]:
    """``(flat_t[flat_k], positions)`` with exactly one host sync, the count of kept values (the size of what is
    saved; ``masked_select`` / ``nonzero`` would each sync on their own). Device-agnostic; used off the CPU."""
    idx = torch.nonzero_static(flat_k, size=int(flat_k.sum())).view(-1)
    return flat_t.index_select(0, idx), idx


def pack_sparse(t: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, PackedSparse]:
    """``(positions, values, meta)`` of ``where(keep, t, 0)``: values of the kept entries in memory order and
    their positions as a 1-bit mask or int32 indices, whichever takes fewer bytes."""
    if keep.shape != t.shape:
        raise ValueError(f"keep mask shape {tuple(keep.shape)} != tensor shape {tuple(t.shape)}")
    fmt = memory_format_of(t)
    flat_t, flat_k = flat_memory_view(t), flat_memory_view(keep.contiguous(memory_format=fmt))
    numel = t.numel()
    if t.device.type == "cpu":
        values, idx = flat_t.masked_select(flat_k), None
    else:
        values, idx = _kept_values_device(flat_t, flat_k)
    indexed = 4 * values.numel() < (numel + 7) // 8 and numel < 2**31
    if indexed:
        positions = (flat_k.nonzero().view(-1) if idx is None else idx).to(torch.int32)
    else:
        positions = pack_bits(flat_k.to(torch.uint8), 1)
    return positions, values, PackedSparse(t.shape, fmt, numel, indexed)


def pack_above(t: Tensor, thr: Tensor | float, use_kernels: bool = True) -> tuple[Tensor, Tensor, PackedSparse]:
    """:func:`pack_sparse` of ``keep = |t| >= thr`` (``thr`` compared as fp32), through the compiled kernels
    for CPU fp32/bf16 tensors when they are available. A threshold tensor on an accelerator stays a tensor (no
    host sync for it) and takes the torch ops."""
    k = _cpu_kernels_for(t, thr) if use_kernels else None
    if k is None:
        return pack_sparse(t, magnitude_mask(t, thr))
    flat = flat_memory_view(t)
    bits, values, offsets = k.sparse_pack(flat, float(torch.as_tensor(thr, dtype=torch.float32)))
    meta = PackedSparse(t.shape, memory_format_of(t), t.numel(), False, offsets)
    if 4 * values.numel() < bits.numel() and t.numel() < 2**31:  # very sparse: int32 indices are smaller
        keep = unpack_bits(bits, 1, t.numel()).bool()
        return keep.nonzero().view(-1).to(torch.int32), values, PackedSparse(meta.shape, meta.memory_format,
                                                                             meta.numel, True)
    return bits, values, meta


def unpack_sparse(positions: Tensor, values: Tensor, meta: PackedSparse) -> Tensor:
    """The dense tensor (zeros where nothing was kept) in its original shape, dtype and memory format."""
    k = _cpu_kernels_for(values) if meta.offsets is not None else None
    if k is not None:
        return from_flat_memory(k.sparse_expand(positions, values, meta.offsets, meta.numel), meta.shape,
                                meta.memory_format)
    flat = values.new_zeros(meta.numel)
    if meta.indexed:
        flat.index_copy_(0, positions.long(), values)
    else:
        flat.masked_scatter_(unpack_bits(positions, 1, meta.numel).bool(), values)
    return from_flat_memory(flat, meta.shape, meta.memory_format)
