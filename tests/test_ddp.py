import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PREACT = ["model.name=preact_resnet20", "model.kwargs.shortcut=pad"]


@pytest.mark.parametrize("extra", [[], ["method.name=swat", "swat.sparsity=0.9", "swat.topk_period=2"],
                                   [*PREACT, "method.name=blpa", "blpa.bits=4"],
                                   [*PREACT, "method.name=swat+blpa", "swat.sparsity=0.9", "blpa.bits=4"]],
                         ids=["dense", "swat", "blpa4", "swat+blpa4"])
def test_two_gloo_processes_end_with_identical_weights(tmp_path, extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", LEANPROP_ALLOCATOR="system")
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", str(worker), str(tmp_path), *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a["samples"] == b["samples"] == 32  # 64 images sharded over 2 ranks
    for (k, x), y in zip(a["model"].items(), b["model"].values(), strict=True):
        assert torch.equal(x, y), k
    assert a["final"]["test_top1"] == b["final"]["test_top1"]  # metrics are all-reduced
    assert a["masks"].keys() == b["masks"].keys()
    assert (len(a["masks"]) > 0) == any(e.startswith("method.name=swat") for e in extra)
    for name, mask in a["masks"].items():  # SWAT weight masks identical on every rank
        assert mask is None or torch.equal(mask, b["masks"][name]), name
    # rank 0 alone wrote the run directory
    run = tmp_path / "t"
    assert (run / "checkpoint.pt").exists() and (run / "metrics.csv").exists()
