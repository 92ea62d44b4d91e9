"""``leanprop bench swat_compile``: SWAT under ``torch.compile`` (Inductor, CPU) against eager: what changes in one
training step.

For each SWAT variant on resnet20 (batch 16, seeded weights and batch): one step eager and one compiled from the
same weights, then three more compiled steps whose per-step flags change (recompute / measure / dense_grad;
SWAT-M's budgets move). Recorded: the largest relative L2 distance of a parameter's gradient (and of all of them
together), the largest relative difference of an activation threshold, Dynamo's graph breaks and graphs, graphs
compiled by the later steps (recompiles) and recompile-limit hits, and the bytes kept for backward
(:func:`leanprop.accounting.memory.saved_bytes`, which sees the compiled graphs' saved tensors too) compiled over
eager. fp32; bf16 autocast (compiled bf16 against eager bf16), with Inductor's default precision and with
``emulate_precision_casts`` (Inductor rounds to bf16 where eager does). No timings (see ``leanprop bench
matrix --compile`` for step times).

    leanprop bench swat_compile                     # 7 methods x 3 modes, a few minutes on 2 cores

One JSONL record per (variant, mode) in benchmarks/results/swat_compile.jsonl; a table on stdout
(docs/methods/swat.md, "torch.compile").
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run", "main", "measure", "VARIANTS", "MODES"]

KIND = "swat_compile"
VARIANTS = {
    "dense": None,
    "swat-u90": dict(sparsity=0.9, sparse_kernels="never"),
    "swat-erk90": dict(sparsity=0.9, distribution="erk", sparse_kernels="never"),
    "swat-filter70": dict(sparsity=0.7, structure="filter", sparse_kernels="never"),
    "swat-u90-packed": dict(sparsity=0.9, compress_saved=True, sparse_kernels="never"),
    "swat-m90": dict(sparsity=0.9, distribution="momentum", sparse_kernels="never"),
    "swat-u90-csr": dict(sparsity=0.9, sparse_kernels="always"),
}
MODES = ("fp32", "bf16", "bf16-emulate")


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(KIND, help="SWAT under torch.compile against eager: gradients, graph breaks, kept bytes",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--methods", default=",".join(VARIANTS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default="benchmarks/results/swat_compile.jsonl")
    p.set_defaults(bench_run=run)


def _step(fwd, net, x, y, amp: bool) -> dict:
    import torch
    import torch.nn.functional as F

    for p in net.parameters():
        p.grad = None
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        out = fwd(x)
    F.cross_entropy(out.float(), y).backward()
    return {n: p.grad.detach().double().clone() for n, p in net.named_parameters()}


def measure(variant: str, mode: str, model: str, batch: int) -> dict:
    import copy

    import torch
    import torch._inductor.config as inductor_config

    import leanprop
    from leanprop import models
    from leanprop.accounting.memory import saved_bytes
    from leanprop.modes import CompileStats

    amp = mode != "fp32"
    torch.manual_seed(0)
    base = models.create(model, num_classes=10)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    runs = []
    torch._dynamo.reset()
    with inductor_config.patch(emulate_precision_casts=mode == "bf16-emulate"):
        for compiled in (False, True):
            net = copy.deepcopy(base).train()
            cfg = VARIANTS[variant]
            layers = {} if cfg is None else leanprop.convert_(net, leanprop.SWATConfig(**cfg)).layers
            fwd = torch.compile(net) if compiled else net
            first, later = CompileStats(), CompileStats()
            with first:
                grads = _step(fwd, net, x, y, amp)
            thr = {n: float(layer.x_threshold) for n, layer in layers.items()}
            with later:
                for flags in [(False, True, False), (True, False, True), (False, False, True)]:
                    for layer in layers.values():
                        layer.recompute, layer.measure, layer.dense_grad = flags
                        if variant == "swat-m90" and layer.sparsity > 0:
                            layer.sparsity = min(0.95, layer.sparsity + 0.01)
                    _step(fwd, net, x, y, amp)
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                kept = saved_bytes(fwd, x).total_bytes
            runs.append((grads, thr, kept, first, later))
    (g_e, t_e, k_e, _, _), (g_c, t_c, k_c, first, later) = runs
    dist = {n: float((g_c[n] - g_e[n]).norm() / g_e[n].norm().clamp_min(1e-30)) for n in g_e}
    worst = max(dist, key=dist.get)
    total = float(torch.cat([(g_c[n] - g_e[n]).flatten() for n in g_e]).norm()
                  / torch.cat([v.flatten() for v in g_e.values()]).norm())
    thr = max([abs(t_c[n] - t_e[n]) / max(abs(t_e[n]), 1e-30) for n in t_e] or [0.0])
    return {"bench": "swat_compile", "model": model, "batch": batch, "method": variant, "mode": mode,
            "grad_rel_l2_max": dist[worst], "worst_param": worst, "grad_rel_l2_all": total,
            "x_threshold_rel_max": thr, "graph_breaks": first.graph_breaks, "graphs": first.graphs,
            "recompiled_graphs": later.graphs, "recompile_limit_hits": first.recompile_limit_hits
            + later.recompile_limit_hits, "kept_bytes_eager": k_e, "kept_bytes_compiled": k_c,
            "kept_vs_eager": k_c / k_e}


def run(a: argparse.Namespace) -> int:
    import torch

    from leanprop.utils import append_jsonl, run_context

    torch.set_num_threads(1)
    env, ts = run_context()
    print("| method | mode | grad rel L2 (worst param) | all params | x-threshold | graph breaks | graphs | "
          "recompiled | limit hits | kept x eager |\n|---|---|---|---|---|---|---|---|---|---|")
    for variant in a.methods.split(","):
        for mode in a.modes.split(","):
            try:
                r = measure(variant, mode, a.model, a.batch)
            except (RuntimeError, NotImplementedError) as e:  # e.g. CSR kernels have no bf16 on CPU, eager either
                msg = str(e).splitlines()[0][:120]
                append_jsonl(a.out, [{"bench": "swat_compile", "model": a.model, "batch": a.batch,
                                      "method": variant, "mode": mode, "error": msg, "env": env, "timestamp": ts}])
                print(f"| {variant} | {mode} | raised: {msg} |", flush=True)
                continue
            append_jsonl(a.out, [{**r, "env": env, "timestamp": ts}])
            print(f"| {variant} | {mode} | {r['grad_rel_l2_max']:.2e} ({r['worst_param']}) | "
                  f"{r['grad_rel_l2_all']:.2e} | {r['x_threshold_rel_max']:.1e} | {r['graph_breaks']} | "
                  f"{r['graphs']} | {r['recompiled_graphs']} | {r['recompile_limit_hits']} | "
                  f"{r['kept_vs_eager']:.4f} |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``leanprop bench swat_compile ARGV`` (``benchmarks/swat_compile.py``)."""
    from leanprop.bench import script_main

    return script_main(KIND, argv)
