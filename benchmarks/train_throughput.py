"""Dense training throughput: images/s of full SGD steps (forward, loss, backward, update) per model,
batch, thread count and dtype, plus images/s of the data pipeline alone.

Each measurement is one JSONL record (machine, torch version, allocator, git sha included); the markdown
report ``docs/benchmarks.md`` is regenerated from the JSONL (``benchmarks/report.py``).

    python benchmarks/train_throughput.py                       # default matrix (~10 min on 2 cores)
    python benchmarks/train_throughput.py --quick               # 1 model, few steps (smoke)
    python benchmarks/train_throughput.py --models resnet20 --threads 1 2 --dtype fp32 bf16

Steps run on a fixed random batch, so the number is the model's, not the loader's; the data-pipeline
record times the real augmented CIFAR-10 loader when the data is found, else the synthetic one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import append_records, run_context, write_report  # noqa: E402

from leanprop import models  # noqa: E402
from leanprop.config import DataConfig  # noqa: E402
from leanprop.data import build_data  # noqa: E402

DEFAULT_JSONL = ROOT / "benchmarks" / "results" / "train_throughput.jsonl"


def time_train_steps(model_name: str, batch: int, dtype: str, channels_last: bool, steps: int,
                     warmup: int) -> list[float]:
    info = models.model_info(model_name)
    model = models.create(model_name)
    size = info.input_size
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10 if info.family == "cifar" else 1000, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def time_data_pipeline(batch: int, data_dir: str | None, epochs: int = 1) -> dict:
    cfg = DataConfig(name="cifar10", root=data_dir, batch_size=batch)
    try:
        bundle = build_data(cfg, progress=sys.stderr.isatty())
    except FileNotFoundError:
        cfg = DataConfig(name="synthetic", synthetic_train=50000, batch_size=batch)
        bundle = build_data(cfg, progress=False)
    n = 0
    t0 = time.perf_counter()
    for e in range(epochs):
        bundle.train.set_epoch(e)
        for x, _ in bundle.train:
            n += x.shape[0]
    secs = time.perf_counter() - t0
    return {"dataset": bundle.description, "images": n, "seconds": secs, "images_per_s": n / secs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "cifar_resnet18", "preact_resnet56", "resnet50"])
    ap.add_argument("--batch", type=int, default=None, help="default: 128 for CIFAR models, 32 for ImageNet ones")
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    ap.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--channels-last", choices=["on", "off", "both"], default="on")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--data-dir", default=None, help="for the data-pipeline record ($LEANPROP_DATA if unset)")
    ap.add_argument("--no-data", action="store_true", help="skip the data-pipeline record")
    ap.add_argument("--quick", action="store_true", help="resnet20 only, 3 steps: a smoke run")
    ap.add_argument("--out", default=str(DEFAULT_JSONL))
    ap.add_argument("--report", default=str(ROOT / "docs" / "benchmarks.md"), help="'' to skip the report")
    a = ap.parse_args(argv)
    if a.quick:
        a.models, a.steps, a.warmup = ["resnet20"], 3, 1
    cl_opts = {"on": [True], "off": [False], "both": [False, True]}[a.channels_last]
    base, stamp = run_context()
    records = []
    for threads in a.threads:
        torch.set_num_threads(threads)
        for name in a.models:
            info = models.model_info(name)
            batch = a.batch or (128 if info.family == "cifar" else 32)
            for dtype in a.dtype:
                for cl in cl_opts:
                    times = time_train_steps(name, batch, dtype, cl, a.steps, a.warmup)
                    med = statistics.median(times)
                    rec = {**base, "bench": "train_throughput", "method": "dense", "model": name,
                           "input_size": info.input_size, "batch": batch, "threads": threads, "dtype": dtype,
                           "channels_last": cl, "steps": len(times), "step_ms_median": 1000 * med,
                           "step_ms_min": 1000 * min(times), "images_per_s": batch / med, "timestamp": stamp}
                    records.append(rec)
                    print(f"{name:<16} bs {batch:<4} {threads} thr {dtype:<4} cl={int(cl)}  "
                          f"{1000 * med:8.1f} ms/step  {batch / med:8.1f} img/s", flush=True)
    if not a.no_data:
        torch.set_num_threads(base["threads"])
        d = time_data_pipeline(128, a.data_dir)
        records.append({**base, "bench": "data_pipeline", "batch": 128, "timestamp": stamp, **d})
        print(f"data pipeline ({d['dataset']}): {d['images_per_s']:.0f} img/s", flush=True)
    append_records(Path(a.out), records)
    if a.report:
        write_report(Path(a.out).parent, Path(a.report))
        print(f"wrote {a.out} and {a.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
