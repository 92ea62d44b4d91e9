"""SWAT training step time against dense, measured in the same run (issue target: SWAT-U90 / dense <= 1.10).

Dense and SWAT models are stepped alternately, one step each per round, so host noise hits both alike;
the ratio is of the medians. SWAT steps include everything SWAT adds: weight masking, the activation
mask, the exact Top-K every ``topk_period`` steps (amortised: the rounds cover several periods) and the
controller. A separate record times the pieces: exact thresholds of all layers, and the mask pass.

    python benchmarks/swat_speed.py                      # resnet20 + cifar_resnet18, bs 128, 2 and 1 threads
    python benchmarks/swat_speed.py --models resnet20 --rounds 10 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import append_records, run_context, write_report  # noqa: E402

import leanprop  # noqa: E402
from leanprop import models  # noqa: E402

DEFAULT_JSONL = ROOT / "benchmarks" / "results" / "swat_speed.jsonl"


def _step(model, opt, x, y, ctl=None) -> float:
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if ctl is not None:
        ctl.step()
    return time.perf_counter() - t0


def measure(model_name: str, batch: int, cfg: leanprop.SWATConfig, rounds: int, warmup: int,
            channels_last: bool) -> dict:
    torch.manual_seed(0)
    dense = models.create(model_name)
    swat = copy.deepcopy(dense)
    ctl = leanprop.convert_(swat, cfg)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        dense, swat = (m.to(memory_format=torch.channels_last) for m in (dense, swat))
        x = x.contiguous(memory_format=torch.channels_last)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4) for m in (dense, swat)]
    ctl.attach_optimizer(opts[1])
    td, ts = [], []
    for r in range(warmup + rounds):
        a = _step(dense, opts[0], x, y)
        b = _step(swat, opts[1], x, y, ctl)
        if r >= warmup:
            td.append(a)
            ts.append(b)
    return {"dense_ms": 1000 * statistics.median(td), "swat_ms": 1000 * statistics.median(ts),
            "swat_mean_ms": 1000 * statistics.mean(ts), "dense_mean_ms": 1000 * statistics.mean(td),
            "ratio": statistics.median(ts) / statistics.median(td),
            "ratio_mean": statistics.mean(ts) / statistics.mean(td), "rounds": rounds,
            "measured": ctl.measured_sparsity()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "cifar_resnet18"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--distribution", default="uniform")
    ap.add_argument("--topk-period", type=int, default=10, help="official ResNet-18 U90 config: 10")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--channels-last", choices=["on", "off"], default="on")
    ap.add_argument("--out", default=str(DEFAULT_JSONL))
    ap.add_argument("--report", default=str(ROOT / "docs" / "benchmarks.md"), help="'' to skip the report")
    a = ap.parse_args(argv)
    cfg = leanprop.SWATConfig(sparsity=a.sparsity, distribution=a.distribution, topk_period=a.topk_period,
                              sparse_kernels="never")  # this benchmark times the masked dense kernels
    base, stamp = run_context()
    records = []
    for threads in a.threads:
        torch.set_num_threads(threads)
        for name in a.models:
            r = measure(name, a.batch, cfg, a.rounds, a.warmup, a.channels_last == "on")
            method = f"swat-{a.distribution[0]}{round(100 * a.sparsity)}"
            rec = {**base, "bench": "swat_speed", "model": name, "batch": a.batch, "threads": threads,
                   "method": method, "topk_period": a.topk_period, "channels_last": a.channels_last == "on",
                   "timestamp": stamp, **r}
            rec["threads"] = threads
            records.append(rec)
            print(f"{name:<16} {threads} thr  dense {r['dense_ms']:8.1f} ms  {method} {r['swat_ms']:8.1f} ms  "
                  f"ratio {r['ratio']:.3f} (means {r['ratio_mean']:.3f})", flush=True)
    append_records(Path(a.out), records)
    if a.report:
        write_report(Path(a.out).parent, Path(a.report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
