"""SWAT Top-K operators (spec swat.md §1.2, §7 check 3): keep counts, exact thresholds, masks, structured masks."""

from __future__ import annotations

import math

import pytest
import torch

from leanprop.ops import sparsify as sparsify_mod
from leanprop.swat import topk
from leanprop.swat.topk import (
    keep_count,
    magnitude_mask,
    magnitude_threshold,
    sparsify,
    structured_keep_mask,
    structured_scores,
)


def reference_threshold(t: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(t.abs().flatten().float(), k).values[-1]


# ---------------------------------------------------------------- keep_count


@pytest.mark.parametrize(("numel", "s", "k"), [
    (10, 0.9, 1), (10, 0.7, 3), (10, 0.3, 7), (100, 0.99, 1), (1000, 0.999, 1), (7, 0.5, 4), (3, 0.5, 2),
    (10, 0.0, 10), (10, 1.0, 0), (0, 0.5, 0), (1, 0.9, 1), (1, 0.999999, 1), (128 * 64 * 32 * 32, 0.9, 838861),
    (2359296, 0.9, 235930), (1000, 0.95, 50), (1000, 0.8, 200), (60, 0.1, 54),
])
def test_keep_count(numel, s, k):
    assert keep_count(numel, s) == k


def test_keep_count_matches_exact_ceil_on_a_grid():
    from fractions import Fraction
    for numel in (1, 3, 10, 64, 100, 333, 1000, 4096):
        for pct in range(0, 101):
            s = pct / 100
            exact = math.ceil((1 - Fraction(pct, 100)) * numel)
            assert keep_count(numel, s) == exact, (numel, s)


def test_keep_count_rejects_bad_sparsity():
    with pytest.raises(ValueError):
        keep_count(10, -0.1)
    with pytest.raises(ValueError):
        keep_count(10, 1.5)


# ---------------------------------------------------------------- exact threshold


def _tensors(gen):
    """(name, tensor) pairs: plain, negative, ReLU-like with many zeros, heavy ties, low precision, layouts."""
    yield "randn_act", torch.randn(32, 16, 16, 16, generator=gen)                        # 131072 > SMALL_NUMEL
    yield "randn_weight", torch.randn(128, 64, 3, 3, generator=gen)
    yield "small", torch.randn(7, 11, generator=gen)
    yield "negative", -torch.rand(70001, generator=gen)
    yield "relu_60pct_zero", torch.relu(torch.randn(100_000, generator=gen) - 0.25)
    yield "relu_95pct_zero", torch.relu(torch.randn(100_000, generator=gen) - 1.645)
    yield "int_ties", torch.randint(-4, 5, (90_000,), generator=gen).float()
    yield "all_equal", torch.full((70_000,), -2.5)
    yield "all_zero", torch.zeros(66_000)
    yield "bf16", torch.randn(300, 300, generator=gen).bfloat16()
    yield "fp16", torch.randn(300, 300, generator=gen).half()
    yield "fp64", torch.randn(300, 300, generator=gen).double()
    yield "channels_last", torch.randn(16, 24, 20, 20, generator=gen).contiguous(memory_format=torch.channels_last)
    yield "strided_view", torch.randn(200, 800, generator=gen)[:, ::2]
    yield "odd_numel", torch.randn(65_541, generator=gen)
    yield "heavy_tail", torch.randn(80_000, generator=gen).pow(5)


@pytest.fixture(params=["default", "always_bracket"])
def selection_path(request, monkeypatch):
    """Run a test with the default size cut-over, and with the bracketed selection forced for every size."""
    if request.param == "always_bracket":
        monkeypatch.setattr(topk, "SMALL_NUMEL", 0)
    return request.param


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.9, 0.99, 0.9999])
def test_exact_threshold_matches_topk_bit_for_bit(s, selection_path):
    gen = torch.Generator().manual_seed(1234)
    for name, t in _tensors(gen):
        k = keep_count(t.numel(), s)
        thr = magnitude_threshold(t, k)
        assert thr.dtype == torch.float32 and thr.dim() == 0 and thr.device == t.device
        if k >= t.numel():
            assert thr.item() == 0.0, name  # keep everything
            continue
        ref = reference_threshold(t, k)
        assert torch.equal(thr, ref), (name, s, thr.item(), ref.item())


@pytest.mark.parametrize("k_kind", ["one", "two", "numel_minus_1", "numel"])
def test_exact_threshold_extreme_k(k_kind, selection_path):
    t = torch.randn(100_003, generator=torch.Generator().manual_seed(5))
    n = t.numel()
    k = {"one": 1, "two": 2, "numel_minus_1": n - 1, "numel": n}[k_kind]
    thr = magnitude_threshold(t, k)
    if k == n:
        assert thr.item() == 0.0
        assert magnitude_mask(t, thr).all()
    else:
        assert torch.equal(thr, reference_threshold(t, k))
        assert int(magnitude_mask(t, thr).sum()) == k  # continuous values: no ties
    assert magnitude_threshold(t, 0).item() == math.inf
    assert magnitude_threshold(t, n + 5).item() == 0.0


def test_exact_threshold_many_random_cases(selection_path):
    """Random shapes, sparsities and distributions, including the bracket's retry and fallback paths."""
    gen = torch.Generator().manual_seed(99)
    for _ in range(40):
        n = int(torch.randint(1_000, 300_000, (1,), generator=gen))
        kind = int(torch.randint(0, 4, (1,), generator=gen))
        t = torch.randn(n, generator=gen)
        if kind == 1:
            t = torch.relu(t)
        elif kind == 2:
            t = torch.round(t * 4)  # 4 values per unit: heavy ties everywhere
        elif kind == 3:
            t = t.bfloat16()
        k = int(torch.randint(1, n, (1,), generator=gen))
        assert torch.equal(magnitude_threshold(t, k), reference_threshold(t, k)), (n, kind, k)


def test_bracket_failure_falls_back_to_exact(monkeypatch, selection_path):
    """An adversarial bracket (the sample sees none of the large values) still returns the exact answer."""
    t = torch.zeros(200_000)
    t[:300] = torch.arange(1, 301, dtype=torch.float32)  # large values only at the front, ties of 0 elsewhere
    monkeypatch.setattr(topk, "_quasi_random_indices",
                        lambda n, m, device: torch.arange(n - m, n, device=device))  # samples only zeros
    for k in (1, 10, 299, 300, 301, 5000):
        assert torch.equal(magnitude_threshold(t, k), reference_threshold(t, k)), k


def test_bracket_moves_up_and_down_without_falling_back(monkeypatch):
    """A bracket on the wrong side moves (ties at the answer, or a sample that saw only large values) and still
    finds the exact answer without the full kthvalue."""
    outcomes = []
    select = topk._bracketed_select

    def recording_select(key, keep, lo, hi):
        out = select(key, keep, lo, hi)
        outcomes.append(out if isinstance(out, int) else 0)
        return out

    def no_fallback(flat_abs, keep):
        raise AssertionError("fell back to the full kthvalue")

    monkeypatch.setattr(topk, "_bracketed_select", recording_select)
    gen = torch.Generator().manual_seed(8)
    ties = torch.round(torch.randn(300_000, generator=gen) * 4)  # the answer sits inside a large tie block
    for k in (7_102, 40_554, 55_354, 149_454, 210_000):
        monkeypatch.setattr(topk, "_reference_threshold", no_fallback)
        got = magnitude_threshold(ties, k)
        monkeypatch.undo()
        monkeypatch.setattr(topk, "_bracketed_select", recording_select)
        assert torch.equal(got, reference_threshold(ties, k)), k
    t = torch.rand(200_000, generator=gen)
    t[:10_000] += 1000.0
    monkeypatch.setattr(topk, "_quasi_random_indices", lambda n, m, device: torch.arange(m, device=device))
    monkeypatch.setattr(topk, "_reference_threshold", no_fallback)
    got = magnitude_threshold(t, 50_000)  # the sample saw only the large values: the bracket must move down
    monkeypatch.undo()
    assert torch.equal(got, reference_threshold(t, 50_000))
    assert 1 in outcomes and -1 in outcomes


def test_mask_keeps_exactly_k_without_ties_and_at_least_k_with_ties(selection_path):
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(64, 32, 8, 8, generator=gen)  # continuous: no ties
    for s in (0.5, 0.8, 0.9, 0.95):
        k = keep_count(t.numel(), s)
        assert int(magnitude_mask(t, magnitude_threshold(t, k)).sum()) == k
        assert int((sparsify(t, magnitude_threshold(t, k)) != 0).sum()) == k
    ties = torch.randint(-3, 4, (100_000,), generator=gen).float()
    for s in (0.3, 0.5, 0.9):
        k = keep_count(ties.numel(), s)
        nnz = int(magnitude_mask(ties, magnitude_threshold(ties, k)).sum())
        assert nnz >= k
        # and it is the smallest such count: the next distinct value up would keep fewer than k
        thr = magnitude_threshold(ties, k).item()
        assert int((ties.abs() > thr).sum()) < k


def test_relu_activation_with_more_than_s_zeros_gets_threshold_zero():
    """Spec §1.2: after a ReLU with more than s zeros, thr = 0 and nothing extra is dropped."""
    x = torch.relu(torch.randn(32, 16, 16, 16, generator=torch.Generator().manual_seed(0)) - 1.5)  # ~93 % zeros
    k = keep_count(x.numel(), 0.9)
    thr = magnitude_threshold(x, k)
    assert thr.item() == 0.0
    assert sparsify(x, thr) is x


def test_activation_k_is_counted_over_the_whole_batch():
    """One global K over N·C·H·W (spec §1.2), not K per sample: samples with larger values keep more entries."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 8, 8, generator=gen) * torch.arange(1, 9).view(8, 1, 1, 1)
    k = keep_count(x.numel(), 0.9)
    kept = magnitude_mask(x, magnitude_threshold(x, k))
    assert int(kept.sum()) == k == math.ceil(0.1 * 8 * 4 * 8 * 8)
    per_sample = kept.flatten(1).sum(1)
    assert per_sample[-1] > per_sample[0]
    assert len(set(per_sample.tolist())) > 1


def test_nans_count_as_the_largest_magnitudes_like_topk(selection_path):
    t = torch.randn(200_000, generator=torch.Generator().manual_seed(4))
    t[::1000] = math.nan  # 200 NaNs
    for k in (1, 200, 201, 5000):
        got, ref = magnitude_threshold(t, k), reference_threshold(t, k)
        assert torch.equal(got, ref) or (got.isnan() and ref.isnan()), k
    assert magnitude_threshold(t, 150).isnan() and not magnitude_threshold(t, 201).isnan()


def test_threshold_of_weight_with_grad_and_bf16():
    w = torch.randn(64, 32, 3, 3, requires_grad=True)
    thr = magnitude_threshold(w, 1000)
    assert not thr.requires_grad
    assert torch.equal(thr, reference_threshold(w.detach(), 1000))
    wb = w.detach().bfloat16()
    assert torch.equal(magnitude_threshold(wb, 1000), reference_threshold(wb, 1000))


def test_unknown_estimator_rejected():
    with pytest.raises(ValueError):
        magnitude_threshold(torch.randn(10), 3, estimator="median")


# ---------------------------------------------------------------- sample estimator


def test_sample_estimator_hits_target_density_within_tolerance():
    """1M entries, 16384 samples: the kept fraction is within 1 % absolute of the target (about 4 sigma)."""
    t = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    for s in (0.5, 0.9, 0.95):
        k = keep_count(t.numel(), s)
        gen = torch.Generator().manual_seed(7)
        thr = magnitude_threshold(t, k, estimator="sample", sample_size=16384, generator=gen)
        assert thr.dtype == torch.float32 and thr.dim() == 0
        density = float(magnitude_mask(t, thr).float().mean())
        assert abs(density - (1 - s)) < 0.01, (s, density)


def test_sample_estimator_is_deterministic_with_generator_and_exact_when_sample_covers_tensor():
    t = torch.randn(200_000)
    a = magnitude_threshold(t, 1000, estimator="sample", generator=torch.Generator().manual_seed(1))
    b = magnitude_threshold(t, 1000, estimator="sample", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    small = torch.randn(500)
    assert torch.equal(magnitude_threshold(small, 17, estimator="sample"), reference_threshold(small, 17))


def test_exact_estimator_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    magnitude_threshold(torch.randn(200_000, generator=torch.Generator().manual_seed(2)), 5000)
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------- sparsify


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_sparsify_matches_where(dtype, as_tensor):
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(4, 8, 6, 6, generator=gen).to(dtype)
    for thr_v in (1e-8, 0.3, 1.0, 1.0001, 2.5, math.inf):
        thr32 = torch.tensor(thr_v, dtype=torch.float32)
        thr = thr32 if as_tensor else thr32.item()
        expected = torch.where(t.float().abs() >= thr32, t, torch.zeros((), dtype=dtype))
        out = sparsify(t, thr)
        assert out.dtype == dtype and out.shape == t.shape
        assert torch.equal(out, expected), (dtype, thr_v)


def test_sparsify_exact_at_the_threshold_for_low_precision():
    """A threshold between two bf16 values: |t| >= thr is compared against the fp32 threshold, not a rounded one."""
    t = torch.tensor([1.0, -1.0, 1.0078125, -1.0078125, 0.5], dtype=torch.bfloat16)  # 1.0078125 = next bf16 after 1
    out = sparsify(t, 1.00001)
    assert out.tolist() == [0.0, 0.0, 1.0078125, -1.0078125, 0.0]
    assert sparsify(t, torch.tensor(1.0)).tolist() == [1.0, -1.0, 1.0078125, -1.0078125, 0.0]
    assert magnitude_mask(t, 1.00001).tolist() == [False, False, True, True, False]


def test_sparsify_thresholds_that_keep_everything_return_the_same_tensor():
    t = torch.randn(10, 10)
    assert sparsify(t, None) is t
    assert sparsify(t, 0.0) is t
    assert sparsify(t, torch.tensor(0.0)) is t
    assert sparsify(t, -1.0) is t
    out = sparsify(t, math.inf)
    assert torch.equal(out, torch.zeros_like(t))
    inf_t = torch.tensor([math.inf, -math.inf, 1e30])
    assert sparsify(inf_t, math.inf).tolist() == [math.inf, -math.inf, 0.0]


def test_sparsify_keeps_negatives_and_memory_format():
    t = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    out = sparsify(t, 0.7)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, torch.where(t.abs() >= 0.7, t, 0.0))
    assert (out < 0).any()


def test_sparsify_tensor_path_without_host_sync_matches(monkeypatch):
    """The device path (used on accelerators and under torch.compile) agrees with the fused CPU path."""
    monkeypatch.setattr(sparsify_mod, "compiling", lambda: True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.randn(1000).to(dtype)
        for v in (0.0, 0.25, 1.00001, math.inf):
            thr = torch.tensor(v)
            expected = torch.where(t.float().abs() >= v, t, torch.zeros((), dtype=dtype))
            assert torch.equal(sparsify(t, thr), expected), (dtype, v)


def test_magnitude_mask_semantics():
    t = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    assert magnitude_mask(t, 0.5).tolist() == [True, True, False, True, True]
    assert magnitude_mask(t, torch.tensor(0.0)).all()


# ---------------------------------------------------------------- structured


def test_structured_scores_shapes_and_values():
    w = torch.randn(6, 4, 3, 3)
    ch = structured_scores(w, "channel")
    fi = structured_scores(w, "filter")
    assert ch.shape == (6, 4) and fi.shape == (6,)
    assert torch.allclose(ch[2, 1], w[2, 1].abs().sum())
    assert torch.allclose(fi[5], w[5].abs().sum())
    wg = torch.randn(8, 2, 3, 3)  # grouped conv: Cin/groups = 2
    assert structured_scores(wg, "channel").shape == (8, 2)
    with pytest.raises(ValueError):
        structured_scores(w, "block")


@pytest.mark.parametrize("structure", ["channel", "filter"])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.7, 0.9])
def test_structured_mask_zeroes_whole_kernels_and_keeps_the_count(structure, s):
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    mask = structured_keep_mask(w, s, structure)
    assert mask.dtype == torch.bool
    assert mask.shape == ((16, 8, 1, 1) if structure == "channel" else (16, 1, 1, 1))
    count = 16 * 8 if structure == "channel" else 16
    assert int(mask.sum()) == keep_count(count, s)
    ws = w * mask
    # every kernel / filter is either untouched or entirely zero
    units = ws.flatten(2) if structure == "channel" else ws.flatten(1)
    zero = (units == 0).all(-1)
    assert int((~zero).sum()) == keep_count(count, s)
    # the kept ones are the highest-scoring
    scores = structured_scores(w, structure)
    if s > 0:
        assert scores[mask.reshape(scores.shape)].min() >= scores[~mask.reshape(scores.shape)].max()


def test_structured_mask_keeps_ties():
    w = torch.ones(4, 4, 3, 3)
    w[0, 0] = 5.0
    mask = structured_keep_mask(w, 0.9, "channel")  # K = ceil(0.1·16) = 2, but 15 kernels tie at the 2nd place
    assert int(mask.sum()) == 16
    w[0] = 5.0
    mask = structured_keep_mask(w, 0.75, "filter")  # K = 1: filter 0 wins outright
    assert mask.flatten().tolist() == [True, False, False, False]


def test_structured_mask_for_linear_weight():
    w = torch.randn(10, 20)
    mask = structured_keep_mask(w, 0.8, "filter")
    assert mask.shape == (10, 1) and int(mask.sum()) == 2
    mask = structured_keep_mask(w, 0.8, "channel")
    assert mask.shape == (10, 20) and int(mask.sum()) == 40
