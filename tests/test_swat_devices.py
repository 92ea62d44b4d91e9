"""SWAT's accelerator code paths, exercised on the CPU: they are device-agnostic functions, so each is called
directly and checked against the CPU path it replaces (no GPU here; benchmarks/gpu_check.sh runs them on one)."""

import pytest
import torch
from torch import nn

import leanprop
from leanprop.ops import sparse_storage as storage
from leanprop.swat.controller import SWATController
from leanprop.swat.layers import SWATConv2d, top_filters
from leanprop.swat.topk import _reference_threshold, _select_device, keep_count, structured_keep_mask


def _cases():
    g = torch.Generator().manual_seed(0)
    relu = torch.relu(torch.randn(50_000, generator=g))  # half zeros: heavy ties at the bottom
    ties = torch.randint(0, 7, (4096,), generator=g).float()  # few distinct values
    nans = torch.randn(1000, generator=g)
    nans[::97] = float("nan")
    return {"relu": relu, "ties": ties, "nans": nans, "tiny": torch.randn(3, generator=g)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", ["relu", "ties", "nans", "tiny"])
def test_accelerator_selection_equals_the_cpu_reference(case, dtype):
    """The accelerators' exact threshold (an unsorted topk's minimum, no sort, no host sync) is bit for bit the
    kthvalue reference, for keep counts on both sides of n/2, ties and NaNs included."""
    t = _cases()[case].to(dtype).abs()
    n = t.numel()
    for keep in sorted({1, 2, n // 10, n // 2, n - n // 10, n - 1, n} - {0}):
        ref = _reference_threshold(t, keep)
        got = _select_device(t, keep)
        assert got.dtype == torch.float32 and got.shape == ()
        assert torch.equal(got, ref) or (got.isnan() and ref.isnan()), (case, dtype, keep, got, ref)


def test_accelerator_kept_filters_equal_the_cpu_mask_without_ties():
    torch.manual_seed(0)
    w = torch.randn(24, 8, 3, 3)
    for s in (0.0, 0.3, 0.7, 0.95):
        mask = structured_keep_mask(w, s, "filter").view(-1)
        assert torch.equal(top_filters(w, s), mask.nonzero().view(-1)), s
    tied = torch.ones(6, 2, 1, 1)  # every score ties: the fixed-count path keeps exactly K (CPU keeps all)
    assert top_filters(tied, 0.5).numel() == keep_count(6, 0.5) == 3
    assert structured_keep_mask(tied, 0.5, "filter").sum() == 6


def test_accelerator_packing_gathers_the_same_values():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, 8, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    keep = t.abs() > 1.0
    flat_t, flat_k = storage.flat_memory_view(t), storage.flat_memory_view(keep)
    values, idx = storage._kept_values_device(flat_t, flat_k)
    assert torch.equal(values, flat_t.masked_select(flat_k))
    assert torch.equal(idx, flat_k.nonzero().view(-1))


def test_cpu_kernels_are_never_taken_for_other_devices():
    """The compiled pack/expand kernels read raw CPU memory: a tensor (or threshold) of another device type --
    'meta' stands in for CUDA here -- must take the torch ops."""
    cpu = torch.randn(64)
    meta = torch.empty(64, device="meta")
    assert storage._cpu_kernels_for(meta) is None
    assert storage._cpu_kernels_for(meta.bfloat16()) is None
    assert storage._cpu_kernels_for(cpu, torch.tensor(0.5, device="meta")) is None
    assert storage._cpu_kernels_for(cpu.double()) is None  # no fp64 kernel
    assert storage._cpu_kernels_for(cpu) is storage._kernels()  # the CPU one (None without a C compiler)


def test_kernel_choice_is_rank_zeros_under_distributed(monkeypatch):
    """Each rank times its own kernels; timings differ, so every rank adopts rank 0's choice."""
    import torch.distributed as dist

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    ctl = leanprop.convert_(model, leanprop.SWATConfig(sparsity=0.9, sparsify_first_layer=True))
    assert isinstance(ctl, SWATController) and all(isinstance(m, SWATConv2d) for m in ctl.layers.values())
    rank0 = {"timings": [], "sparse_ops": {name: ["coo", None, "csr"] for name in ctl.layers}}
    sent = []

    def broadcast(box, src):
        assert src == 0
        sent.append(box[0])
        box[0] = rank0

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    ctl.calibrate_kernels(torch.randn(2, 3, 8, 8), timer=lambda *_: 1.0)
    assert len(sent) == 1 and set(sent[0]["sparse_ops"]) == set(ctl.layers)
    assert all(layer.sparse_ops == ("coo", None, "csr") for layer in ctl.layers.values())
    rank0["sparse_ops"] = {"other": [None, None, None]}
    with pytest.raises(RuntimeError, match="rank 0 has other SWAT layers"):
        ctl.calibrate_kernels(torch.randn(2, 3, 8, 8), timer=lambda *_: 1.0)


def test_density_measurement_stays_on_the_device():
    """The measured densities accumulate as tensors (no float() per layer): the same numbers as counted here."""
    conv = SWATConv2d.from_dense(nn.Conv2d(4, 4, 3, padding=1, bias=False), 0.75,
                                 leanprop.SWATConfig(sparsity=0.75, sparse_kernels="never"))
    conv.train()
    conv.measure = True
    x = torch.relu(torch.randn(2, 4, 6, 6))
    conv(x).sum().backward()
    d_w, d_x = conv.swat_measured_density
    assert d_w == pytest.approx(float((conv.weight.abs() >= conv.w_threshold).sum()) / conv.weight.numel())
    assert d_x == pytest.approx(float(((x >= conv.x_threshold) & (x > 0)).sum()) / x.numel())


def test_forced_csr_kernels_refuse_bf16_on_cpu_at_configuration_time():
    """CSR products have no bf16 CPU kernel: sparse_kernels="always" with bf16 autocast is refused up front with
    the fix, instead of a NotImplementedError in the first backward."""
    from leanprop.config import ConfigError
    from leanprop.modes import ExecutionMode, check_mode

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    ctl = leanprop.convert_(model, leanprop.SWATConfig(sparsity=0.9, sparse_kernels="always"))
    with pytest.raises(ConfigError, match="set swat.sparse_kernels=auto"):
        check_mode(ctl, ExecutionMode("cpu", "bf16"), method="swat")
    check_mode(ctl, ExecutionMode("cpu", None, compile=True), method="swat")  # fp32: the CSR kernels exist
    auto = leanprop.convert_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)), leanprop.SWATConfig(sparsity=0.9))
    check_mode(auto, ExecutionMode("cpu", "bf16"), method="swat")
