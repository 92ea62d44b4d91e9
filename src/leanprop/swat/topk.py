"""SWAT's Top-K operators: keep counts, magnitude thresholds, masking, structured masks.

Raihan & Aamodt, NeurIPS 2020 (Top-K, threshold reuse); docs/methods/swat.md (fp32 thresholds, optional sampled
estimator that must default to exact). ``TopK_s(T)`` keeps the ``K = ceil((1-s)·numel)`` largest-|·| entries of
the *whole* tensor (batch included for activations) with the mask ``|T| >= thr``, so ties are kept (nnz >= K).

The exact threshold on CPU avoids a full ``kthvalue``/``topk`` (single-threaded, ~1.5x a conv forward for a
(128,64,32,32) activation): a deterministic quasi-random sample brackets the answer between two candidate values,
exact counts over the whole tensor verify the bracket, and ``kthvalue`` then runs on the few entries inside it.
The result is the exact K-th largest |value|, bit for bit equal to ``topk(|t|.flatten().float(), K).values[-1]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from leanprop.ops.sparsify import magnitude_mask, sparsify  # noqa: F401 (re-exported)

__all__ = [
    "keep_count",
    "magnitude_threshold",
    "magnitude_mask",
    "sparsify",
    "structured_scores",
    "structured_keep_mask",
]

# Below this many elements a plain kthvalue is as fast as the bracketed selection (measured on 2 Xeon cores).
SMALL_NUMEL = 100_000
# Bracket sample size m: n / _SAMPLE_DIV clamped to this range. The candidate band then holds ~ 2·Z·sqrt(p(1-p)/m)
# of the tensor for keep fraction p (~0.9 % for m = 65536, p = 0.1).
_BRACKET_SAMPLE = (1 << 13, 1 << 16)
_SAMPLE_DIV = 128
_BRACKET_Z = 4.0
_BRACKET_TRIES = 4  # bracket moves before the plain kthvalue fallback
_GOLDEN = 0.6180339887498949
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
             torch.float16: torch.int16}


def keep_count(numel: int, sparsity: float) -> int:
    """``K = ceil((1 - s)·numel)`` (docs/methods/swat.md, 'Top-K'), clamped to [0, numel].

    Products within a relative 1e-9 of an integer count as that integer, so float error in ``1 - s`` does not add
    an entry (s=0.7, numel=10 gives 3, not 4).
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    numel = int(numel)
    if sparsity == 0.0:
        return numel
    x = (1.0 - float(sparsity)) * numel
    r = round(x)
    k = r if abs(x - r) <= 1e-9 * max(1.0, x) else math.ceil(x)
    return max(0, min(numel, int(k)))


def _flat(a: Tensor) -> Tensor:
    """A 1-D view of a dense tensor in memory order (channels_last included); copies only if not dense."""
    if a.is_contiguous():
        return a.view(-1)
    perm = sorted(range(a.dim()), key=lambda d: (-a.stride(d), d))
    p = a.permute(perm)
    return p.view(-1) if p.is_contiguous() else a.reshape(-1)


def _abs_flat(t: Tensor) -> Tensor:
    a = t.detach().abs()
    if a.dtype not in _INT_VIEW:
        a = a.float()
    return _flat(a)


def _fp32(v: Tensor) -> Tensor:
    return v.to(torch.float32).reshape(())


def _reference_threshold(flat_abs: Tensor, keep: int) -> Tensor:
    """Plain ``kthvalue`` (CPU) or :func:`_select_device` (accelerators, no host sync) on the flattened |t|."""
    if flat_abs.device.type == "cpu":
        return _fp32(torch.kthvalue(flat_abs, flat_abs.numel() - keep + 1).values)
    return _select_device(flat_abs, keep)


def _select_device(flat_abs: Tensor, keep: int) -> Tensor:
    """The keep-th largest of the non-negative ``flat_abs`` as a 0-d fp32 tensor, with no host sync: the minimum
    of an *unsorted* ``topk`` (the accelerators' radix selection, no sort of the K kept values), taken on the
    integer view so that NaNs order last exactly as in ``topk`` (a NaN is the answer only when more than
    ``numel - keep`` entries are NaN). Device-agnostic: on CPU it equals the ``kthvalue`` reference bit for bit.

    ``kthvalue`` is not used on accelerators: CUDA runs it with one thread block per slice, so a single
    flattened activation (e.g. 256x64x112x112) would be selected by one block."""
    if flat_abs.dtype not in _INT_VIEW:
        flat_abs = flat_abs.float()
    dtype = flat_abs.dtype
    key = flat_abs.view(_INT_VIEW[dtype])
    n = key.numel()
    if keep <= n - keep:  # the smaller side: min of the keep largest
        kth = torch.topk(key, keep, sorted=False).values.min()
    else:  # max of the n - keep + 1 smallest
        kth = torch.topk(key, n - keep + 1, largest=False, sorted=False).values.max()
    return _fp32(kth.view(dtype))


def _quasi_random_indices(n: int, m: int, device: torch.device) -> Tensor:
    """``m`` well-spread positions in [0, n): the Weyl sequence ``i·step mod n`` with ``step/n`` near the golden
    ratio and coprime to ``n`` (so no position repeats); deterministic, uses no RNG state."""
    step = max(1, round(_GOLDEN * n)) | 1
    while math.gcd(step, n) != 1:
        step += 2
    return torch.arange(0, m * step, step, dtype=torch.int64, device=device).remainder_(n)


def _compact(key: Tensor, mask: Tensor) -> Tensor:
    """``key[mask]`` for a sparse mask: find the 8-entry chunks holding any True (one int64 each), then select
    only inside those: 2-3x cheaper than a plain masked_select over the whole tensor when ~1 % are True."""
    n8 = mask.numel() // 8 * 8
    chunks = mask[:n8].view(torch.int64).nonzero().squeeze(1)
    vals = key[:n8].view(-1, 8).index_select(0, chunks)
    sel = vals[mask[:n8].view(-1, 8).index_select(0, chunks)]
    if n8 < mask.numel():
        sel = torch.cat([sel, key[n8:][mask[n8:]]])
    return sel


def _bracketed_select(key: Tensor, keep: int, lo: int, hi: int | None) -> Tensor | int:
    """The keep-th largest of ``key`` (non-negative ints ordered like the |values|) if it lies in [lo, hi);
    otherwise +1 (it is >= hi) or -1 (it is < lo). Every count is exact; entries equal to ``lo`` are never
    gathered, so heavy ties there (ReLU zeros) cost nothing."""
    if hi is not None:
        above = key >= hi
        c_hi = int(torch.count_nonzero(above))
        if c_hi >= keep:
            return 1
        band_mask = torch.gt(key, lo).bitwise_xor_(above)  # lo < key < hi  (hi > lo, so above ⊂ key > lo)
    else:
        c_hi = 0
        band_mask = torch.gt(key, lo)
    band = _compact(key, band_mask)
    rank = keep - c_hi  # rank of the answer from the top inside the band, >= 1
    if band.numel() >= rank:
        return torch.kthvalue(band, band.numel() - rank + 1).values
    # Fewer than `keep` entries are > lo: the answer is lo itself if at least `keep` entries are >= lo.
    if lo == 0 or int(torch.count_nonzero(key >= lo)) >= keep:
        return torch.tensor(lo, dtype=key.dtype)
    return -1


def _exact_threshold_cpu(flat_abs: Tensor, keep: int) -> Tensor:
    dtype = flat_abs.dtype
    key = flat_abs.view(_INT_VIEW[dtype])  # for non-negative floats the integer order is the value order (NaN last)
    n = key.numel()
    m = min(n, max(_BRACKET_SAMPLE[0], min(_BRACKET_SAMPLE[1], n // _SAMPLE_DIV)))
    sample = key[_quasi_random_indices(n, m, key.device)]

    def order_stat(i: int) -> int | None:  # i-th smallest sample key (0-based); None above the sample
        return 0 if i < 0 else None if i >= m else int(torch.kthvalue(sample, i + 1).values)

    p = keep / n
    center = (1.0 - p) * m  # ascending position of the answer in the sample
    half = _BRACKET_Z * math.sqrt(p * (1.0 - p) * m) + 2.0
    i_lo, i_hi = math.floor(center - half), math.ceil(center + half)
    lo, hi = order_stat(i_lo), order_stat(i_hi)
    for _ in range(_BRACKET_TRIES):
        found = _bracketed_select(key, keep, lo, None if hi is None else max(hi, lo + 1))
        if isinstance(found, Tensor):
            return _fp32(found.view(dtype))
        # Move the bracket past the failed side, four times further (ties or an unlucky sample).
        width = 4 * (i_hi - i_lo)
        if found > 0:
            lo, i_lo, i_hi = max(hi, lo + 1), i_hi, i_hi + width
            hi = order_stat(i_hi)
        else:
            hi, i_hi, i_lo = lo, i_lo, i_lo - width
            lo = order_stat(i_lo)
    return _reference_threshold(flat_abs, keep)


def _sampled_threshold(t: Tensor, keep: int, sample_size: int, generator: torch.Generator | None) -> Tensor:
    flat = _flat(t.detach())
    n = flat.numel()
    m = max(1, int(sample_size))
    if m >= n:
        return _reference_threshold(_abs_flat(t), keep)
    gen_device = generator.device if generator is not None else flat.device
    idx = torch.randint(0, n, (m,), generator=generator, device=gen_device).to(flat.device)
    sample = flat[idx].abs().float()
    k = min(m, max(1, math.ceil(keep / n * m)))
    return _reference_threshold(sample, k)


@torch.compiler.disable
def magnitude_threshold(t: Tensor, keep: int, *, estimator: str = "exact", sample_size: int = 16384,
                        generator: torch.Generator | None = None) -> Tensor:
    """The keep-th largest |t| over the whole flattened tensor, as a 0-d float32 tensor on ``t``'s device.

    Always eager (``torch.compiler.disable``): the selection is data-dependent (its CPU path compacts a band of
    candidates through an integer view that Inductor mis-compiles under dynamic shapes), so under
    ``torch.compile`` it is a graph break, never a traced approximation.

    The mask ``|t| >= thr`` then keeps exactly ``keep`` entries when there are no ties, more with ties
    (docs/methods/swat.md, 'Top-K').
    ``keep >= numel`` gives 0 (keep all); ``keep <= 0`` gives +inf. Computed in fp32 whatever ``t``'s dtype.

    estimator="exact" (default) is exact on every device; on CPU it uses a verified sample-bracketed selection
    (several times faster than ``kthvalue``; its ``.item()`` calls would be host syncs, so accelerators use
    an unsorted ``topk``, :func:`_select_device`). estimator="sample" is approximate: the quantile of
    ``sample_size`` entries drawn uniformly with replacement (``generator`` makes it deterministic); the kept
    fraction is off by ~sqrt(p(1-p)/sample_size).
    NaNs count as the largest magnitudes, as in ``torch.topk``.
    """
    n = t.numel()
    if keep >= n:
        return torch.zeros((), dtype=torch.float32, device=t.device)
    if keep <= 0:
        return torch.full((), math.inf, dtype=torch.float32, device=t.device)
    with torch.no_grad():
        if estimator == "sample":
            return _sampled_threshold(t, keep, sample_size, generator)
        if estimator != "exact":
            raise ValueError(f"threshold estimator {estimator!r}: use 'exact' or 'sample'")
        flat_abs = _abs_flat(t)
        if flat_abs.device.type != "cpu" or n < SMALL_NUMEL:
            return _reference_threshold(flat_abs, keep)
        return _exact_threshold_cpu(flat_abs, keep)


def structured_scores(w: Tensor, structure: str) -> Tensor:
    """L1 scores (fp32) for structured weight Top-K (docs/methods/swat.md, 'Structured'): "channel" → one per
    (out, in) kernel, shape (Cout, Cin/groups); "filter" → one per output filter, shape (Cout,)."""
    if w.dim() < 2:
        raise ValueError(f"structured scores need a weight with >= 2 dims, got shape {tuple(w.shape)}")
    a = w.detach().abs().float()
    if structure == "channel":
        return a.sum(dim=tuple(range(2, w.dim()))) if w.dim() > 2 else a
    if structure == "filter":
        return a.sum(dim=tuple(range(1, w.dim())))
    raise ValueError(f"structure {structure!r}: use 'channel' or 'filter'")


def structured_keep_mask(w: Tensor, sparsity: float, structure: str) -> Tensor:
    """Bool mask broadcastable to ``w`` ((Cout, Cin, 1, 1) for "channel", (Cout, 1, 1, 1) for "filter") keeping
    the ``ceil((1-s)·count)`` highest-scoring kernels or filters, ties kept (docs/methods/swat.md, 'Structured')."""
    scores = structured_scores(w, structure)
    keep = keep_count(scores.numel(), sparsity)
    thr = magnitude_threshold(scores, keep)
    mask = scores >= thr
    return mask.reshape(tuple(mask.shape) + (1,) * (w.dim() - mask.dim()))
