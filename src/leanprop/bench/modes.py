"""``leanprop bench modes``: every method's training steps in each execution mode against its reference.

The same weights (one seed) and the same random batch, a few SGD steps (forward, cross-entropy, backward,
optimizer and controller step) in a mode (:class:`leanprop.modes.ExecutionMode`) and in its reference:

* compiled against eager in the same dtype and layout (``torch.compile`` must not change what is computed);
* channels-last against contiguous, same dtype;
* anything else (bf16 autocast, CUDA fp32/bf16/fp16 with a GradScaler) against eager fp32 on the CPU.

Per step: the loss and the parameter gradients; the record keeps the largest loss difference, the largest
relative L2 distance of all gradients together (``grad_rel_l2``) and of the worst conv/linear weight
(``grad_rel_l2_worst``, ``worst_param``), and under compile the graph breaks, graphs compiled and recompile-limit
hits (:class:`leanprop.modes.CompileStats`); with ``--kept`` also the bytes kept for backward in the mode against
the reference (saved-tensor audit); with ``--exact`` also each side's distance to plain PyTorch (dense in the
reference mode: how far the method itself is from exact, compiled and not). tests/test_modes.py checks the same runs
against per-mode tolerances; ``leanprop report`` tabulates the records (docs/benchmarks.md, "Execution modes").

    leanprop bench modes                                    # the matrix: every method, every CPU mode
    leanprop bench modes --methods blpa4 --modes cpu-fp32-compile --models resnet20,mobilenet_v2 --kept --exact

Dropout runs with p = 0: a compiled dropout draws other masks than eager's, so its gradients would differ by the
random stream alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["METHODS", "MODEL_OF", "CPU_MODES", "CUDA_MODES", "StepRun", "reference_mode", "model_for", "run_steps",
           "grad_distance", "grad_cosine", "compare", "add_parser", "run"]

#: every method of the mode matrix (`leanprop bench memory` names)
METHODS = ("dense", "swat-u90", "swat-erk90", "swat-filter70", "swat-u90-packed", "blpa8", "blpa4", "blpa2",
           "swat-u90+blpa4")
#: the tiny model each method family runs on: post-activation ResNet-8 for dense and SWAT, the pre-activation one
#: (BN->ReLU->conv units, shortcut=pad) for BLPA and SWAT+BLPA
#: the model of a method: pre-activation blocks (BN->ReLU->conv units to compress) for a method that compresses saved
#: activations, else the post-activation ResNet
MODEL_OF = {False: "resnet8", True: "preact_resnet8"}
CPU_MODES = ("cpu-bf16", "cpu-fp32-nhwc", "cpu-fp32-compile", "cpu-bf16-compile")
CUDA_MODES = ("cuda-fp32", "cuda-bf16", "cuda-fp16", "cuda-fp32-nhwc", "cuda-fp32-compile", "cuda-bf16-compile")


def reference_mode(mode: Any) -> Any:
    """What ``mode`` is measured against: compiled -> eager in the same dtype/layout/device; channels-last ->
    contiguous; otherwise eager fp32 on the CPU."""
    from leanprop.modes import ExecutionMode

    if mode.compile:
        return dataclasses.replace(mode, compile=False)
    if mode.channels_last:
        return dataclasses.replace(mode, channels_last=False)
    return ExecutionMode("cpu")


def model_for(method: str) -> str:
    """The model a method runs on in the mode matrix (:data:`MODEL_OF`)."""
    from leanprop.methods import method_for, parse_method

    return MODEL_OF[any(method_for(c).compresses_saved for c in parse_method(method))]


@dataclass
class StepRun:
    """Steps of one method in one mode: ``losses`` and ``grads`` (per step, ``{parameter name: float64 CPU
    tensor}``), ``compile`` (:meth:`leanprop.modes.CompileStats.as_dict` under compile), ``kept_bytes`` (bytes kept
    for backward, when measured) and ``seconds`` (wall time of the steps, compilation included)."""

    losses: list[float]
    grads: list[dict[str, Any]]
    compile: dict[str, Any] | None = None
    kept_bytes: int | None = None
    seconds: float = 0.0
    emulate_precision_casts: bool = False


def run_steps(method: str, mode: Any, *, model: str | None = None, batch: int = 16, steps: int = 1, seed: int = 0,
              lr: float = 0.01, measure_kept: bool = False, fp16_init_scale: float = 2.0**10,
              emulate_precision_casts: bool | None = None) -> StepRun:
    """``steps`` training steps of ``method`` on ``model`` (default :func:`model_for`; a registry name or a
    ``package.module:factory``) in ``mode``, from the weights of ``seed`` on one seeded random batch of the model's
    input size and 10 classes (SGD, momentum 0.9, the controller's ``step()`` after each; dropout with p = 0). A
    mode the method refuses raises :class:`leanprop.config.ConfigError` (:func:`leanprop.modes.check_mode`).
    fp16 scales the loss with a GradScaler starting at ``fp16_init_scale`` and unscales before the gradients are
    read. SWAT layers keep their dense kernels (no kernel calibration: the comparison is about the mode).
    ``emulate_precision_casts`` (default: on for compiled bf16/fp16): Inductor rounds its fused intermediates to the
    autocast dtype where eager does (``torch._inductor.config.emulate_precision_casts``), so a compiled low-precision
    step is compared with eager's arithmetic rather than with fp32-kept intermediates eager never has."""
    import torch
    import torch.nn.functional as F

    from leanprop.accounting.memory import build_model, make_batch, normalize_spec, saved_bytes
    from leanprop.bench.memory import default_model_kwargs
    from leanprop.modes import CompileStats, check_mode
    from leanprop.timing import device_sync, time_calls

    name = model or model_for(method)
    spec = normalize_spec({"model": name, "model_kwargs": default_model_kwargs(name, {}), "method": method,
                           "num_classes": 10, "seed": seed})
    net, handle = build_model(spec)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
    check_mode(handle, mode, method=method)
    device = torch.device(mode.device)
    net.to(device)
    if mode.channels_last:
        net.to(memory_format=torch.channels_last)
    net.train()
    x, y = make_batch(spec, batch)
    x, y = x.to(device), y.to(device)
    if mode.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    handle.attach_optimizer(opt)
    if mode.compile:  # a fresh Dynamo cache: another model's graphs (same classes) would be reused and counted there
        torch._dynamo.reset()
    fwd = torch.compile(net) if mode.compile else net
    scaler = torch.amp.GradScaler("cuda", init_scale=fp16_init_scale) if mode.amp == "fp16" else None
    names = [n for n, _ in net.named_parameters()]
    losses: list[float] = []
    grads: list[dict[str, Any]] = []
    stats = CompileStats() if mode.compile else contextlib.nullcontext()
    emulate = bool(mode.compile and mode.amp is not None and emulate_precision_casts is not False)

    def precision() -> contextlib.AbstractContextManager:
        if not emulate:
            return contextlib.nullcontext()
        import torch._inductor.config as inductor_config

        return inductor_config.patch(emulate_precision_casts=True)

    def one_step() -> None:
        opt.zero_grad(set_to_none=True)
        with mode.autocast():
            out = fwd(x)
            loss = F.cross_entropy(out.float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad.detach().to("cpu", torch.float64) for n, p in zip(
            names, net.parameters(), strict=True) if p.grad is not None})
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        handle.step()

    with precision(), stats:  # wall time of the steps, compilation included
        seconds = time_calls(one_step, reps=steps, sync=device_sync(device))
    kept = None
    if measure_kept:
        with precision(), mode.autocast():
            kept = saved_bytes(fwd, x, lambda out: F.cross_entropy(out.float(), y)).total_bytes
    return StepRun(losses, grads, stats.as_dict() if mode.compile else None, kept, sum(seconds), emulate)


def grad_distance(run: dict[str, Any], ref: dict[str, Any]) -> tuple[float, float, str]:
    """``(relative L2 of all gradients together, worst relative L2 of one conv/linear weight, its name)`` of one
    step's gradients against the reference's. A parameter missing on one side counts as all of its norm."""
    import torch

    num = den = 0.0
    worst, worst_name = 0.0, ""
    for name in sorted(set(run) | set(ref)):
        a, b = run.get(name), ref.get(name)
        if b is None:
            b = torch.zeros_like(a)
        if a is None:
            a = torch.zeros_like(b)
        d2, r2 = float((a - b).pow(2).sum()), float(b.pow(2).sum())
        num, den = num + d2, den + r2
        if b.dim() >= 2 and r2 > 0:
            rel = math.sqrt(d2 / r2)
            if rel > worst or not worst_name:
                worst, worst_name = rel, name
    total = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    return total, worst, worst_name


def grad_cosine(run: dict[str, Any], ref: dict[str, Any]) -> float:
    """Cosine between all of one step's gradients and the reference's (parameters of either side)."""
    dot = na = nb = 0.0
    for name in set(run) | set(ref):
        a, b = run.get(name), ref.get(name)
        if a is not None and b is not None:
            dot += float((a * b).sum())
        na += 0.0 if a is None else float(a.pow(2).sum())
        nb += 0.0 if b is None else float(b.pow(2).sum())
    return dot / math.sqrt(na * nb) if na > 0 and nb > 0 else float(na == nb)


def compare(method: str, mode: Any, run: StepRun, ref: StepRun, *, model: str | None = None,
            batch: int | None = None, exact: StepRun | None = None) -> dict[str, Any]:
    """The record of ``run`` (``method`` in ``mode``) against ``ref`` (the same steps in
    :func:`reference_mode`): per-step maxima of the loss difference and the gradient distances. ``exact``: dense
    (plain PyTorch) in the reference mode; the first step's gradients of ``run`` and of ``ref`` are measured against
    its (relative L2 and cosine: ``grad_rel_l2_exact``/``grad_cos_exact`` and ``..._exact_ref``)."""
    dists = [grad_distance(a, b) for a, b in zip(run.grads, ref.grads, strict=True)]
    total = max(d[0] for d in dists)
    worst = max(dists, key=lambda d: d[1])
    rec: dict[str, Any] = {
        "bench": "modes", "model": model or model_for(method), "method": method, "mode": mode.name,
        "reference": reference_mode(mode).name, "device": mode.device, "amp": mode.amp or "fp32",
        "compile": mode.compile, "channels_last": mode.channels_last, "batch": batch, "steps": len(run.losses),
        "loss": run.losses, "loss_ref": ref.losses,
        "loss_diff": max(abs(a - b) for a, b in zip(run.losses, ref.losses, strict=True)),
        "grad_rel_l2": total, "grad_rel_l2_steps": [d[0] for d in dists], "grad_rel_l2_worst": worst[1],
        "worst_param": worst[2], "seconds": round(run.seconds, 2),
    }
    if run.compile is not None:
        rec.update(run.compile, emulate_precision_casts=run.emulate_precision_casts)
    if exact is not None:
        rec.update(grad_rel_l2_exact=grad_distance(run.grads[0], exact.grads[0])[0],
                   grad_rel_l2_exact_ref=grad_distance(ref.grads[0], exact.grads[0])[0],
                   grad_cos_exact=grad_cosine(run.grads[0], exact.grads[0]),
                   grad_cos_exact_ref=grad_cosine(ref.grads[0], exact.grads[0]))
    if run.kept_bytes is not None and ref.kept_bytes:
        rec.update(kept_bytes=run.kept_bytes, kept_bytes_ref=ref.kept_bytes,
                   kept_vs_ref=run.kept_bytes / ref.kept_bytes)
    return rec


# --------------------------------------------------------------------------------------------------------
# the command


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "modes", help="every method in each execution mode (bf16, compile, channels-last, CUDA) against eager",
        description=__doc__.split("\n\n")[0] + " Writes JSONL records (gradient distances, graph breaks); "
        "`leanprop report` tabulates them.")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all of the matrix)")
    p.add_argument("--modes", help="comma-separated DEVICE[-DTYPE][-compile][-nhwc] (default: every mode of "
                   "--device: " + ", ".join(CPU_MODES) + " | " + ", ".join(CUDA_MODES) + ")")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="the modes to run by default")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="training steps compared (default 3)")
    p.add_argument("--threads", type=int, help="torch threads (default: PyTorch's)")
    p.add_argument("--models", help="comma-separated registry names or package.module:factory (default: each "
                   "method's own tiny model: " + ", ".join(f"{v} ({'BLPA, SWAT+BLPA' if k else 'dense, SWAT'})"
                                                          for k, v in MODEL_OF.items()) + ")")
    p.add_argument("--kept", action="store_true", help="also audit the bytes kept for backward in each mode")
    p.add_argument("--exact", action="store_true", help="also measure each side's first-step gradients against "
                   "plain PyTorch (dense in the reference mode)")
    p.add_argument("--out", default="benchmarks/results/modes.jsonl", help="JSONL file records are appended to")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto")
    p.set_defaults(bench_run=run)


def run(a: argparse.Namespace) -> int:
    """Run every (model, method, mode), appending one record each to ``--out`` (refused or failed ones too)."""
    import torch
    from tqdm import tqdm

    from leanprop.accounting.memory import normalize_spec
    from leanprop.config import ConfigError
    from leanprop.methods import parse_method
    from leanprop.modes import ExecutionMode
    from leanprop.utils import append_jsonl, run_context

    methods = [m.strip().lower() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        parse_method(m)  # a ValueError naming the accepted forms
    modes = [ExecutionMode.parse(m) for m in (a.modes.split(",") if a.modes else
                                              (CUDA_MODES if a.device == "cuda" else CPU_MODES)) if m.strip()]
    if any(m.device == "cuda" for m in modes) and not torch.cuda.is_available():
        raise ValueError("a cuda mode was asked for but no CUDA GPU is available: use --device cpu")
    if a.steps < 1 or a.batch < 1:
        raise ValueError("--steps and --batch must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    env, stamp = run_context("cuda" if any(m.device == "cuda" for m in modes) else "cpu")
    given = [m.strip() for m in a.models.split(",") if m.strip()] if a.models else None
    for name in given or ():
        normalize_spec({"model": name})  # a ValueError naming the registry and the factory forms
    cases = [(model, method) for method in methods for model in (given or [model_for(method)])]
    show = {"on": True, "off": False}.get(a.progress, sys.stderr.isatty())
    bar = tqdm(total=len(cases) * len(modes), desc="bench modes", unit="case", disable=not show, file=sys.stderr)
    refs: dict[tuple[str, str, str], StepRun] = {}
    failed = False

    def steps_of(model: str, method: str, mode: Any, cache: bool = True) -> StepRun:
        key = (model, method, mode.name)
        if key in refs:
            return refs[key]
        out = run_steps(method, mode, model=model, batch=a.batch, steps=a.steps, measure_kept=a.kept)
        if cache:
            refs[key] = out
        return out

    for model, method in cases:
        records = []
        for mode in modes:
            bar.set_postfix_str(f"{model} {method} {mode.name}")
            base = {"bench": "modes", "model": model, "method": method, "mode": mode.name,
                    "reference": reference_mode(mode).name, "device": mode.device, "batch": a.batch, **env,
                    "timestamp": stamp}
            try:
                ref_mode = reference_mode(mode)
                ref = steps_of(model, method, ref_mode)
                exact = steps_of(model, "dense", ref_mode) if a.exact else None
                rec = compare(method, mode, steps_of(model, method, mode, cache=False), ref, model=model,
                              batch=a.batch, exact=exact)
                records.append({**base, **rec})
            except ConfigError as e:
                records.append({**base, "refused": str(e)})
            except Exception as e:  # noqa: BLE001 -- one failing case must not lose the others
                failed = True
                records.append({**base, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            bar.update(1)
        append_jsonl(Path(a.out), records)
        for r in records:
            print(_line(r), flush=True)
    bar.close()
    print(f"records in {a.out}; `leanprop report` tabulates them")
    return 1 if failed else 0


def _line(r: dict[str, Any]) -> str:
    head = f"{r['model']} {r['method']:<16} {r['mode']:<18} vs {r['reference']:<10}"
    if "refused" in r:
        return f"{head} refused: {r['refused']}"
    if "error" in r:
        return f"{head} error: {r['error']}"
    comp = (f"  graph breaks {r['graph_breaks']}, graphs {r['graphs']}, recompile-limit hits "
            f"{r['recompile_limit_hits']}" if r.get("compile") else "")
    kept = f"  kept x ref {r['kept_vs_ref']:.3f}" if "kept_vs_ref" in r else ""
    if "grad_rel_l2_exact" in r:
        kept += (f"  vs plain PyTorch: rel L2 {r['grad_rel_l2_exact']:.3f} (reference {r['grad_rel_l2_exact_ref']:.3f})"
                 f", cosine {r['grad_cos_exact']:.4f} ({r['grad_cos_exact_ref']:.4f})")
    return (f"{head} grad rel L2 {r['grad_rel_l2']:.2e} (worst {r['grad_rel_l2_worst']:.2e} {r['worst_param']}), "
            f"loss diff {r['loss_diff']:.1e}{comp}{kept}")
