"""``leanprop bench swat_speed``: SWAT training step time against dense, measured in the same run (target:
SWAT-U90 / dense <= 1.10).

Dense and SWAT models are stepped alternately, one step each per round, so host noise hits both alike;
the ratio is of the medians. SWAT steps include everything SWAT adds: weight masking, the activation
mask, the exact Top-K every ``topk_period`` steps (amortised: the rounds cover several periods) and the
controller.

    leanprop bench swat_speed                      # resnet20 + cifar_resnet18, bs 128, 2 and 1 threads
    leanprop bench swat_speed --models resnet20 --rounds 10 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run", "main", "measure"]

KIND = "swat_speed"


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(KIND, help="SWAT step time against dense (interleaved in one run)",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "cifar_resnet18"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--distribution", default="uniform")
    p.add_argument("--topk-period", type=int, default=10, help="official ResNet-18 U90 config: 10")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--channels-last", choices=["on", "off"], default="on")
    p.add_argument("--out", default="benchmarks/results/swat_speed.jsonl")
    p.add_argument("--report", default="docs/benchmarks.md", help="'' to skip the report")
    p.set_defaults(bench_run=run)


def measure(model_name: str, batch: int, cfg: Any, rounds: int, warmup: int, channels_last: bool) -> dict:
    """Dense and SWAT (``cfg``, a :class:`leanprop.SWATConfig`) steps of one model, interleaved round by round."""
    import copy

    import torch

    import leanprop
    from leanprop import models
    from leanprop.timing import interleaved, training_step

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
    times = interleaved({"dense": training_step(dense, None, opts[0], x, y),
                         "swat": training_step(swat, ctl, opts[1], x, y)}, rounds=rounds, warmup=warmup)
    td, ts = times["dense"], times["swat"]
    return {"dense_ms": 1000 * statistics.median(td), "swat_ms": 1000 * statistics.median(ts),
            "swat_mean_ms": 1000 * statistics.mean(ts), "dense_mean_ms": 1000 * statistics.mean(td),
            "ratio": statistics.median(ts) / statistics.median(td),
            "ratio_mean": statistics.mean(ts) / statistics.mean(td), "rounds": rounds,
            "measured": ctl.measured_sparsity()}


def run(a: argparse.Namespace) -> int:
    import torch

    import leanprop
    from leanprop.bench.report import write_report
    from leanprop.utils import append_jsonl, run_context

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
    append_jsonl(Path(a.out), records)
    if a.report:
        write_report(Path(a.out).parent, Path(a.report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``leanprop bench swat_speed ARGV`` (``benchmarks/swat_speed.py``)."""
    from leanprop.bench import script_main

    return script_main(KIND, argv)
