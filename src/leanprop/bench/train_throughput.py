"""``leanprop bench train_throughput``: dense training throughput, images/s of full SGD steps (forward, loss,
backward, update) per model, batch, thread count and dtype, plus images/s of the data pipeline alone.

Each measurement is one JSONL record (machine, torch version, allocator, git sha included); the markdown
report ``docs/benchmarks.md`` is regenerated from the JSONL (``leanprop report``).

    leanprop bench train_throughput                       # default matrix (~10 min on 2 cores)
    leanprop bench train_throughput --quick               # 1 model, few steps (smoke)
    leanprop bench train_throughput --models resnet20 --threads 1 2 --dtype fp32 bf16

Steps run on a fixed random batch, so the number is the model's, not the loader's; the data-pipeline
record times the real augmented CIFAR-10 loader when the data is found, else the synthetic one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

__all__ = ["add_parser", "run", "main", "time_train_steps", "time_data_pipeline"]

KIND = "train_throughput"


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(KIND, help="dense training throughput (images/s) per model, batch, threads, dtype",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "cifar_resnet18", "preact_resnet56", "resnet50"])
    p.add_argument("--batch", type=int, default=None, help="default: 128 for CIFAR models, 32 for ImageNet ones")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="default: PyTorch's thread count")
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--channels-last", choices=["on", "off", "both"], default="on")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--data-dir", default=None, help="for the data-pipeline record ($LEANPROP_DATA if unset)")
    p.add_argument("--no-data", action="store_true", help="skip the data-pipeline record")
    p.add_argument("--quick", action="store_true", help="resnet20 only, 3 steps: a smoke run")
    p.add_argument("--out", default="benchmarks/results/train_throughput.jsonl")
    p.add_argument("--report", default="docs/benchmarks.md", help="'' to skip the report")
    p.set_defaults(bench_run=run)


def time_train_steps(model_name: str, batch: int, dtype: str, channels_last: bool, steps: int,
                     warmup: int) -> list[float]:
    """Seconds of each of ``steps`` timed training steps (after ``warmup``) of the dense model on a random batch."""
    import torch

    from leanprop import models
    from leanprop.timing import device_sync, time_calls, training_step

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
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else None
    step = training_step(model, None, opt, x, y, autocast=autocast)
    return time_calls(step, reps=steps, warmup=warmup, sync=device_sync(x.device))


def time_data_pipeline(batch: int, data_dir: str | None, epochs: int = 1) -> dict:
    """Images/s of the augmented CIFAR-10 training loader (the synthetic one when the data is not found)."""
    from leanprop.config import DataConfig
    from leanprop.data import build_data
    from leanprop.timing import time_calls

    cfg = DataConfig(name="cifar10", root=data_dir, batch_size=batch)
    try:
        bundle = build_data(cfg, progress=sys.stderr.isatty())
    except FileNotFoundError:
        cfg = DataConfig(name="synthetic", synthetic_train=50000, batch_size=batch)
        bundle = build_data(cfg, progress=False)
    n = 0

    def epochs_of_data() -> None:
        nonlocal n
        for e in range(epochs):
            bundle.train.set_epoch(e)
            for x, _ in bundle.train:
                n += x.shape[0]

    secs = time_calls(epochs_of_data, reps=1)[0]
    return {"dataset": bundle.description, "images": n, "seconds": secs, "images_per_s": n / secs}


def run(a: argparse.Namespace) -> int:
    import torch

    from leanprop import models
    from leanprop.bench.report import write_report
    from leanprop.utils import append_jsonl, run_context

    if a.quick:
        a.models, a.steps, a.warmup = ["resnet20"], 3, 1
    threads_list = a.threads or [torch.get_num_threads()]
    cl_opts = {"on": [True], "off": [False], "both": [False, True]}[a.channels_last]
    base, stamp = run_context()
    records = []
    for threads in threads_list:
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
    append_jsonl(Path(a.out), records)
    if a.report:
        write_report(Path(a.out).parent, Path(a.report))
        print(f"wrote {a.out} and {a.report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``leanprop bench train_throughput ARGV`` (``benchmarks/train_throughput.py``)."""
    from leanprop.bench import script_main

    return script_main(KIND, argv)
