"""Bit packing of 1/2/4/8-bit codes into uint8, in the tensor's memory order (pure torch, vectorised).

Codes are packed along the *memory* order of the tensor they came from (NCHW for contiguous tensors,
NHWC for channels-last ones), so element ``i`` of the flattened buffer goes to byte ``i // k`` with
``k = 8 // bits`` codes per byte, the first code in the most significant bits (as the reference code
``ayanc/blpa`` packs 4-bit codes).
"""

from __future__ import annotations

import torch

__all__ = ["PACK_BITS", "memory_format_of", "flat_memory_view", "from_flat_memory", "pack_bits", "unpack_bits",
           "restride", "packed_numel"]

PACK_BITS = (1, 2, 4, 8)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """``channels_last`` for a 4-D NHWC-contiguous tensor that is not also NCHW-contiguous, else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def flat_memory_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``t`` in memory order (copies only if ``t`` is neither NCHW- nor NHWC-contiguous)."""
    if memory_format_of(t) is torch.channels_last:
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.contiguous().view(-1)


def from_flat_memory(flat: torch.Tensor, shape: torch.Size, memory_format: torch.memory_format) -> torch.Tensor:
    """Inverse of :func:`flat_memory_view`: the logical ``shape`` tensor whose memory is ``flat``."""
    if memory_format is torch.channels_last:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


def restride(t: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """``t`` with the given strides (itself when it has them already): how rebuilt saved tensors get their layout."""
    if t.stride() == tuple(stride):
        return t
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def packed_numel(numel: int, bits: int) -> int:
    k = 8 // bits
    return (numel + k - 1) // k


def _check_bits(bits: int) -> int:
    if bits not in PACK_BITS:
        raise ValueError(f"can only pack 1, 2, 4 or 8-bit codes, got bits={bits}")
    return 8 // bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat uint8 tensor of ``bits``-bit codes (values < 2**bits) into ``ceil(numel*bits/8)`` bytes."""
    k = _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError("pack_bits expects a 1-D uint8 tensor of codes")
    if k == 1:
        return codes
    n = codes.numel()
    rem = (-n) % k
    if rem:
        codes = torch.cat([codes, codes.new_zeros(rem)])
    lanes = codes.view(-1, k)
    out = lanes[:, 0] << (8 - bits)
    for j in range(1, k):
        out |= lanes[:, j] << (8 - bits * (j + 1))
    return out


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes as a flat uint8 tensor."""
    k = _check_bits(bits)
    if k == 1:
        return packed[:numel]
    shifts = torch.arange(8 - bits, -1, -bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(1) >> shifts).bitwise_and_(mask)
    return codes.view(-1)[:numel]
