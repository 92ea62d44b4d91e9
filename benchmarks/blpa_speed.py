"""BLPA training throughput against dense, measured in the same run (issue target: BLPA-4 / dense >= 0.90).

Dense and BLPA models (same weights) are stepped alternately, one full SGD step each per round, so host
noise hits both alike; throughput ratio = median dense step time / median BLPA step time. BLPA steps include
everything BLPA adds: quantise + pack in forward, unpack + closed-form BN backward, and the generic codec for
tensors outside the fused units.

    python benchmarks/blpa_speed.py                      # preact_resnet56 + preact_resnet20, bs 128, bits 4 and 8
    python benchmarks/blpa_speed.py --models preact_resnet164 --bits 4 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import append_records, run_context, write_report  # noqa: E402
from swat_speed import _step  # noqa: E402

import leanprop  # noqa: E402
from leanprop import models  # noqa: E402

DEFAULT_JSONL = ROOT / "benchmarks" / "results" / "blpa_speed.jsonl"


def measure(model_name: str, batch: int, cfg: leanprop.BLPAConfig, rounds: int, warmup: int, channels_last: bool,
            amp: bool) -> dict:
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
    td, tb = [], []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        for r in range(warmup + rounds):
            a = _step(dense, opts[0], x, y)
            b = _step(blpa, opts[1], x, y, ctl)
            if r >= warmup:
                td.append(a)
                tb.append(b)
    return {"dense_ms": 1000 * statistics.median(td), "blpa_ms": 1000 * statistics.median(tb),
            "throughput_ratio": statistics.median(td) / statistics.median(tb),
            "throughput_ratio_mean": statistics.mean(td) / statistics.mean(tb), "rounds": rounds,
            "kernels": "C" if ctl.kernels_path else "torch"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["preact_resnet56", "preact_resnet20"])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--channels-last", choices=["on", "off", "both"], default="both")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], nargs="+", default=["fp32"])
    ap.add_argument("--kernels", choices=["auto", "c", "torch"], default="auto")
    ap.add_argument("--out", default=str(DEFAULT_JSONL))
    ap.add_argument("--report", default=str(ROOT / "docs" / "benchmarks.md"), help="'' to skip the report")
    a = ap.parse_args(argv)
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
    append_records(Path(a.out), records)
    if a.report:
        write_report(Path(a.out).parent, Path(a.report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
