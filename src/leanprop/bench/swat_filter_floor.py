"""``leanprop bench swat_filter_floor``: how fast can filter-structured SWAT be on this machine? The step time it
could reach with these conv kernels.

The targets are filter-structured SWAT-70 steps <= 0.65x dense (the paper's dense weight gradient) and
<= 0.45x with ``dense_grad_period``. A step is convolutions plus everything else (BN, ReLU, adds, pooling,
loss, optimizer). This benchmark times, per conv layer of the model at its real shapes (median of interleaved
repeats, ``torch.ops.aten`` kernels alone):

* dense: forward, input gradient, weight gradient with all filters;
* kept: the same three with only the kept filters (``ceil((1-s) * C_out)``) (what ``swat_filter_conv2d`` runs);

and whole training steps of dense, ``swat-filterS`` and ``swat-filterS-pP`` (interleaved, median). Then

    other  = dense step - sum of the dense conv times          (non-conv work, present in every method)
    floor  = (sum kept forward + kept input grad + DENSE weight grad + other) / dense step
    floor_p = (sum kept fwd + kept igrad + ((P-1) * kept wgrad + dense wgrad) / P + other) / dense step

A floor is what the method would reach if gathering/scattering the kept channels, the Top-K masks and the
controller cost nothing: when it is above the target, no implementation built on these kernels meets it.

    leanprop bench swat_filter_floor                          # cifar_resnet18 + resnet20, bs 128, 2 threads
    leanprop bench swat_filter_floor --models resnet20 --sparsity 0.7 --period 10 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run", "main", "measure", "conv_shapes", "time_conv", "filter_layers"]

KIND = "swat_filter_floor"


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(KIND, help="the step time filter-structured SWAT could reach with these conv kernels",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["cifar_resnet18", "resnet20"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--period", type=int, default=10, help="dense_grad_period of the periodic variant")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per conv kernel")
    p.add_argument("--rounds", type=int, default=5, help="timed training steps per method")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels-last", action="store_true", help="NHWC tensors, kernels and models")
    p.add_argument("--out", default="benchmarks/results/swat_filter_floor.jsonl")
    p.add_argument("--report", default="docs/benchmarks.md", help="'' to skip the report")
    p.set_defaults(bench_run=run)


def conv_shapes(model: Any, batch: int, size: int = 32) -> list[dict]:
    """The input shape, weight shape and conv options of every nn.Conv2d a forward pass runs, in order."""
    import torch
    from torch import nn

    seen: list[dict] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, _n=name: seen.append(
        {"name": _n, "x": list(inp[0].shape), "w": list(mod.weight.shape), "stride": list(mod.stride),
         "padding": list(mod.padding), "dilation": list(mod.dilation), "groups": mod.groups}))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(batch, 3, size, size))
    for h in hooks:
        h.remove()
    return seen


def _median_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median ms of each function, timed interleaved (one untimed round first)."""
    from leanprop.timing import interleaved

    times = interleaved(fns, rounds=repeats, warmup=1)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def time_conv(layer: dict, kept: int, repeats: int, channels_last: bool = False) -> dict[str, float]:
    """Median ms of the dense and the kept-filter forward, input gradient and weight gradient of one conv."""
    import torch
    import torch.nn.functional as F

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(layer["x"], generator=gen).contiguous(memory_format=fmt)
    w = torch.randn(layer["w"], generator=gen).contiguous(memory_format=fmt)
    w_k = w[:kept].contiguous(memory_format=fmt)
    opt = (layer["stride"], layer["padding"], layer["dilation"])
    g = torch.randn(F.conv2d(x, w, None, *opt).shape, generator=gen).contiguous(memory_format=fmt)
    g_k = g[:, :kept].contiguous(memory_format=fmt)
    bwd = torch.ops.aten.convolution_backward

    def grads(gg, ww, mask):
        return lambda: bwd(gg, x, ww, None, *map(list, opt), False, [0, 0], 1, mask)

    return _median_ms({
        "fwd": lambda: F.conv2d(x, w, None, *opt), "igrad": grads(g, w, [True, False, False]),
        "wgrad": grads(g, w, [False, True, False]),
        "fwd_kept": lambda: F.conv2d(x, w_k, None, *opt), "igrad_kept": grads(g_k, w_k, [True, False, False]),
        "wgrad_kept": grads(g_k, w_k, [False, True, False])}, repeats)


def filter_layers(model_name: str, sparsity: float) -> dict[str, int]:
    """``{name: kept filters}`` of the conv layers swat-filter computes with kept filters only (a converted copy
    says, with leanprop's own Top-K count)."""
    import leanprop
    from leanprop import models

    m = models.create(model_name)
    leanprop.convert_(m, leanprop.SWATConfig(sparsity=sparsity, structure="filter"))
    return {n: len(mod.kept_filters()) for n, mod in m.named_modules()
            if getattr(mod, "computes_kept_filters", lambda: False)()}


def measure(model_name: str, batch: int, sparsity: float, period: int, repeats: int, rounds: int,
            channels_last: bool = False) -> dict:
    import torch

    from leanprop import models
    from leanprop.bench.matrix import step_times

    torch.manual_seed(0)
    layers = conv_shapes(models.create(model_name), batch)
    structured = filter_layers(model_name, sparsity)
    per_layer = []
    sums = dict.fromkeys(("fwd", "igrad", "wgrad", "fwd_kept", "igrad_kept", "wgrad_kept"), 0.0)
    for layer in layers:
        kept = structured.get(layer["name"], layer["w"][0])
        t = time_conv(layer, kept, repeats, channels_last)
        if layer["name"] not in structured:  # a dense layer (e.g. the first conv) runs dense in every method
            t.update(fwd_kept=t["fwd"], igrad_kept=t["igrad"], wgrad_kept=t["wgrad"])
        per_layer.append({"name": layer["name"], "x": layer["x"], "w": layer["w"], "kept": kept, **t})
        for k in sums:
            sums[k] += t[k]
    pct = round(sparsity * 100)
    methods = ["dense", f"swat-filter{pct}", f"swat-filter{pct}-p{period}"]
    steps = step_times({"model": model_name, "model_kwargs": {}, "threads": torch.get_num_threads(),
                        "channels_last": channels_last}, methods, batch, rounds, 2)
    dense_ms, filt_ms, per_ms = (statistics.median(steps[m]) * 1000 for m in methods)
    conv_dense = sums["fwd"] + sums["igrad"] + sums["wgrad"]
    other = max(0.0, dense_ms - conv_dense)
    floor = (sums["fwd_kept"] + sums["igrad_kept"] + sums["wgrad"] + other) / dense_ms
    wgrad_p = ((period - 1) * sums["wgrad_kept"] + sums["wgrad"]) / period
    floor_p = (sums["fwd_kept"] + sums["igrad_kept"] + wgrad_p + other) / dense_ms
    return {"bench": "swat_filter_floor", "model": model_name, "batch": batch, "sparsity": sparsity,
            "period": period, "threads": torch.get_num_threads(), "channels_last": channels_last,
            "repeats": repeats, "rounds": rounds,
            "dense_step_ms": dense_ms, "filter_step_ms": filt_ms, "filter_periodic_step_ms": per_ms,
            "conv_ms": dict(sums), "other_ms": other, "other_share": other / dense_ms,
            "wgrad_share": sums["wgrad"] / dense_ms, "floor": floor, "floor_periodic": floor_p,
            "measured": filt_ms / dense_ms, "measured_periodic": per_ms / dense_ms, "layers": per_layer}


def run(a: argparse.Namespace) -> int:
    import torch

    from leanprop.bench.report import write_report
    from leanprop.utils import append_jsonl, run_context

    if not 0 < a.sparsity < 1 or a.period < 2 or a.repeats < 1 or a.rounds < 1:
        raise ValueError("need 0 < --sparsity < 1, --period >= 2, --repeats >= 1, --rounds >= 1")
    torch.set_num_threads(a.threads)
    env, stamp = run_context("cpu")
    for name in a.models:
        rec = {**env, "timestamp": stamp, **measure(name, a.batch, a.sparsity, a.period, a.repeats, a.rounds,
                                                         a.channels_last)}
        append_jsonl(Path(a.out), [rec])
        layout = " (NHWC)" if a.channels_last else ""
        print(f"{name}{layout}: dense step {rec['dense_step_ms']:.0f} ms, non-conv share {rec['other_share']:.3f}, "
              f"dense weight-grad share {rec['wgrad_share']:.3f}; floor {rec['floor']:.3f} "
              f"(measured {rec['measured']:.3f}), "
              f"periodic floor {rec['floor_periodic']:.3f} (measured {rec['measured_periodic']:.3f})", flush=True)
    if a.report:
        write_report(Path(a.out).parent, Path(a.report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``leanprop bench swat_filter_floor ARGV`` (``benchmarks/swat_filter_floor.py``)."""
    from leanprop.bench import script_main

    return script_main(KIND, argv)
