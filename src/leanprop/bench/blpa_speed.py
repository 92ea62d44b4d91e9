"""``leanprop bench blpa_speed``: BLPA training throughput against dense, measured in the same run (target:
BLPA-4 / dense >= 0.90).

Dense and BLPA models (same weights) are stepped alternately, one full SGD step each per round, so host
noise hits both alike; throughput ratio = median dense step time / median BLPA step time. BLPA steps include
everything BLPA adds: quantise + pack in forward, unpack + closed-form BN backward, and the generic codec for
tensors outside the fused units.

    leanprop bench blpa_speed                      # preact_resnet56 + preact_resnet20, bs 128, bits 4 and 8
    leanprop bench blpa_speed --models preact_resnet164 --bits 4 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run", "main", "measure"]

KIND = "blpa_speed"


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(KIND, help="BLPA throughput against dense (interleaved in one run)",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["preact_resnet56", "preact_resnet20"])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--channels-last", choices=["on", "off", "both"], default="both")
    p.add_argument("--dtype", choices=["fp32", "bf16"], nargs="+", default=["fp32"])
    p.add_argument("--kernels", choices=["auto", "c", "torch"], default="auto")
    p.add_argument("--out", default="benchmarks/results/blpa_speed.jsonl")
    p.add_argument("--report", default="docs/benchmarks.md", help="'' to skip the report")
    p.set_defaults(bench_run=run)


def measure(model_name: str, batch: int, cfg: Any, rounds: int, warmup: int, channels_last: bool,
            amp: bool) -> dict:
    """Dense and BLPA (``cfg``, a :class:`leanprop.BLPAConfig`) steps of one model, interleaved round by round
    (``amp``: the whole steps under bf16 autocast)."""
    import copy

    import torch

    import leanprop
    from leanprop import models
    from leanprop.timing import interleaved, training_step

    torch.manual_seed(0)
    dense = models.create(model_name, shortcut="pad")
    blpa = copy.deepcopy(dense)
    ctl = leanprop.convert_(blpa, cfg)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        dense, blpa = (m.to(memory_format=torch.channels_last) for m in (dense, blpa))
        x = x.contiguous(memory_format=torch.channels_last)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4) for m in (dense, blpa)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        times = interleaved({"dense": training_step(dense, None, opts[0], x, y),
                             "blpa": training_step(blpa, ctl, opts[1], x, y)}, rounds=rounds, warmup=warmup)
    td, tb = times["dense"], times["blpa"]
    return {"dense_ms": 1000 * statistics.median(td), "blpa_ms": 1000 * statistics.median(tb),
            "throughput_ratio": statistics.median(td) / statistics.median(tb),
            "throughput_ratio_mean": statistics.mean(td) / statistics.mean(tb), "rounds": rounds,
            "kernels": "C" if ctl.kernels_path else "torch"}


def run(a: argparse.Namespace) -> int:
    import torch

    import leanprop
    from leanprop.bench.report import write_report
    from leanprop.utils import append_jsonl, run_context

    layouts = {"on": [True], "off": [False], "both": [False, True]}[a.channels_last]
    base, stamp = run_context()
    records = []
    for threads in a.threads:
        torch.set_num_threads(threads)
        for name in a.models:
            for dtype in a.dtype:
                for cl in layouts:
                    for bits in a.bits:
                        cfg = leanprop.BLPAConfig(bits=bits, kernels=a.kernels)
                        r = measure(name, a.batch, cfg, a.rounds, a.warmup, cl, dtype == "bf16")
                        rec = {**base, "bench": "blpa_speed", "model": name, "batch": a.batch, "threads": threads,
                               "method": f"blpa{bits}", "dtype": dtype, "channels_last": cl, "timestamp": stamp, **r}
                        records.append(rec)
                        print(f"{name:<18} {threads} thr {dtype} {'NHWC' if cl else 'NCHW'}  dense {r['dense_ms']:7.1f}"
                              f" ms  blpa{bits} {r['blpa_ms']:7.1f} ms  throughput ratio "
                              f"{r['throughput_ratio']:.3f} ({r['kernels']} kernels)", flush=True)
    append_jsonl(Path(a.out), records)
    if a.report:
        write_report(Path(a.out).parent, Path(a.report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``leanprop bench blpa_speed ARGV`` (``benchmarks/blpa_speed.py``)."""
    from leanprop.bench import script_main

    return script_main(KIND, argv)
