"""CUDA paths (marked `cuda`, skipped without a GPU; benchmarks/gpu_check.sh runs them) and the GPU check script's
dry run (CPU, run in the default suite and by .ci/run).

On a GPU: nccl with one rank (the collectives and DDP the trainer uses), memory figures from
``torch.cuda.max_memory_allocated``, the CPU-only C kernels bypassed on CUDA tensors, and resume + eval of a run
trained on CUDA.
"""

import csv
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from ._helpers import synth_overrides

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False); run benchmarks/gpu_check.sh on a GPU machine"
cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]


# ------------------------------------------------------------------------------------------------ the script

def test_gpu_check_dry_run_checks_its_pieces_on_cpu(tmp_path):
    """`gpu_check.sh --dry-run OUT` (what CI runs): imports, the pytest collection of the cuda tests, the bench
    commands' arguments; writes its summary; refuses a missing OUT_DIR with the usage."""
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    for step in ("tools", "collect cuda tests", "imports, bench arguments"):
        assert f"ok   {step}" in summary, summary
    assert "dry run" in summary and "cuda tests collected:" in proc.stdout
    bad = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert bad.returncode == 2 and "usage: benchmarks/gpu_check.sh [--dry-run] OUT_DIR" in bad.stderr


# ------------------------------------------------------------------------------------------------ CUDA

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nccl_one_rank(tmp_path, monkeypatch):
    """A real nccl process group of one rank (file store), torn down afterwards."""
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", [pytest.param(m, marks=cuda) for m in ("dense", "swat-u90-packed", "blpa4")])
def test_nccl_one_rank_collectives_and_ddp_step(nccl_one_rank, method):
    """The collectives the trainer uses (float64 metric sums, BN buffer broadcast) and one DDP step of each method
    on nccl: with one rank DDP's averaged gradients equal the plain model's."""
    from torch import nn

    from leanprop import models
    from leanprop.accounting.memory import apply_method
    from leanprop.train import distributed as du

    dev = torch.device("cuda", 0)
    info = du.DistInfo(rank=0, world_size=2, local_rank=0)  # 'enabled' paths, on a group of one
    assert du.all_reduce_sum([1.5, 2.0, 3.0], dev, info) == [1.5, 2.0, 3.0]

    def build():
        torch.manual_seed(0)
        name = "preact_resnet8" if "blpa" in method else "resnet8"
        m = models.create(name, num_classes=10, **({"shortcut": "pad"} if name.startswith("preact") else {}))
        apply_method(m, method)
        return m.to(dev).train()

    x, y = torch.randn(8, 3, 32, 32, device=dev), torch.randint(0, 10, (8,), device=dev)
    plain, wrapped = build(), build()
    du.broadcast_buffers(wrapped, info)
    ddp = nn.parallel.DistributedDataParallel(wrapped, device_ids=[0])
    for net in (plain, ddp):
        torch.nn.functional.cross_entropy(net(x), y).backward()
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_cuda_memory_figures_from_max_memory_allocated(_):
    """Fresh-process peaks on CUDA are ``torch.cuda.max_memory_allocated``; BLPA-4 keeps and peaks below dense."""
    from leanprop.accounting.memory import build_model, peak_memory, saved_bytes

    spec = {"model": "resnet20", "device": "cuda"}
    peaks = {m: peak_memory({**spec, "method": m}, 64, timeout=120) for m in ("dense", "blpa4", "swat-u90-packed")}
    for m, r in peaks.items():
        assert r["ok"], (m, r)
        assert r["peak_bytes"] == r["max_allocated_bytes"] > r["alloc_before_bytes"] > 0, (m, r)
    assert peaks["blpa4"]["step_peak_growth_bytes"] < peaks["dense"]["step_peak_growth_bytes"]
    kept = {}
    for m in ("dense", "blpa4"):
        model, _ = build_model({**spec, "method": m})
        kept[m] = saved_bytes(model, torch.randn(64, 3, 32, 32, device="cuda")).total_bytes
    assert kept["blpa4"] < 0.4 * kept["dense"]


@pytest.mark.parametrize("_", [pytest.param(0, marks=cuda)])
def test_c_kernels_are_bypassed_on_cuda_tensors(_):
    """The compiled C kernels take CPU memory only: CUDA tensors never reach them (``supports`` says no, and the
    layers with C kernels forced compute on CUDA what the torch-op kernels compute)."""
    from leanprop import models
    from leanprop.blpa.config import BLPAConfig
    from leanprop.nn.convert import convert_
    from leanprop.ops.kernels import CKernels, load_kernels
    from leanprop.swat.config import SWATConfig

    if load_kernels(required=False) is None:
        pytest.skip("no C compiler here: the C kernels are not built, nothing to bypass")
    x = torch.randn(4, 16, 8, 8, device="cuda")
    assert not CKernels.supports(4, x, x)

    def grads(cfg):
        torch.manual_seed(0)
        m = models.create("preact_resnet8", num_classes=10, shortcut="pad")
        convert_(m, cfg)
        m.cuda().train()
        g = torch.Generator().manual_seed(1)
        xb, yb = torch.randn(8, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (8,), generator=g).cuda()
        torch.nn.functional.cross_entropy(m(xb), yb).backward()
        return [p.grad.clone() for p in m.parameters()]

    for c_cfg, torch_cfg in ((BLPAConfig(bits=4, kernels="c"), BLPAConfig(bits=4, kernels="torch")),
                             ([SWATConfig(sparsity=0.9, compress_saved=True, sparse_kernels="never"),
                               BLPAConfig(bits=4, kernels="c")],
                              [SWATConfig(sparsity=0.9, compress_saved=True, sparse_kernels="never"),
                               BLPAConfig(bits=4, kernels="torch")])):
        for a, b in zip(grads(c_cfg), grads(torch_cfg), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", [pytest.param(m, marks=cuda) for m in ("swat", "blpa")])
def test_resume_and_eval_on_cuda(tmp_path, capsys, method):
    """`leanprop train --device cuda` for one epoch, then `--resume auto` with train.epochs=2 (the checkpoint's
    RNG state comes back to the CPU), then `leanprop eval --checkpoint` on CUDA reproduces the final test
    accuracy."""
    from leanprop.cli import main

    sets = synth_overrides(tmp_path, f"method.name={method}", "train.epochs=1")
    if method == "blpa":
        sets += ["model.name=preact_resnet8", "model.kwargs={shortcut: pad}"]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["train", "--device", "cuda", *args]) == 0
    run = tmp_path / "t"
    assert main(["train", "--device", "cuda", "--resume", "auto", *args, "--set", "train.epochs=2"]) == 0
    assert "Resumed" in capsys.readouterr().err
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert f"top-1 {float(rows[-1]['test_top1']):.2f}%" in out, out

