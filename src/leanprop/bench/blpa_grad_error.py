"""``leanprop bench blpa_grad_error``: how far BLPA's gradients are from exact ones, part by part.

On a fixed model and a few CIFAR-10 training batches (the training loader: shuffled, augmented), the gradient of
every parameter (one vector) under each BLPA variant against the exact gradient of the same model on the same
batch (fp32, train mode: the forward is exact, so both see the same batch statistics):

* cosine: ``cos(g, g_exact)``, the mean over batches and the worst one;
* relative error: ``|g - g_exact| / |g_exact|``, the mean over batches;
* drift: ``|mean_b (g - g_exact)| / mean_b |g_exact|`` over the batches: the part of the error that does not
  average out from batch to batch (an unbiased coder's drift falls like 1/sqrt(batches); a biased one's stays).

The variants split BLPA-K into its parts (docs/methods/blpa.md): ``units``: the BN codes only, every other tensor
kept as PyTorch keeps it (the BLPA paper's scope); ``sr``: stochastic rounding; ``bn8``: the BN codes at 8 bits,
the rest of the storage policy at K. ``--checkpoint`` takes a trained model (a ``leanprop train`` checkpoint);
without it the model is the seed-0 initialisation. ``--on METHOD`` adds each variant to another method and
measures against that method alone: ``--on swat-u90`` gives the distance BLPA adds to SWAT's gradients, where
SWAT's kept activations are rebuilt from the units' codes instead of being kept (docs/methods/swat_blpa.md).

    leanprop bench blpa_grad_error --data-dir ../shared/data                     # resnet20 at init, 8 batches
    leanprop bench blpa_grad_error --checkpoint runs/accuracy/acc-resnet20-dense/checkpoint.pt
    leanprop bench blpa_grad_error --on swat-u90 --variants blpa8,blpa4,blpa2

One JSONL record per (model, state, base method, variant) in ``benchmarks/results/blpa_grad_error.jsonl``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run", "main", "VARIANTS", "measure"]

KIND = "blpa_grad_error"

#: name -> BLPAConfig keyword arguments
VARIANTS = {
    "blpa8": {"bits": 8},
    "blpa4": {"bits": 4},
    "blpa4-sr": {"bits": 4, "stochastic": True},
    "blpa4-units": {"bits": 4, "codec_bits": 32, "policy": {"batch_norm": 4}},
    "blpa4-units-sr": {"bits": 4, "codec_bits": 32, "policy": {"batch_norm": 4}, "stochastic": True},
    "blpa4-bn8": {"bits": 4, "policy": {"batch_norm": 8}},
    "blpa2": {"bits": 2},
}


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(KIND, help="BLPA's gradients against exact ones, part by part (BN codes, the rest, "
                                    "rounding)", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--checkpoint", type=Path, default=None, help="a `leanprop train` checkpoint (default: the "
                                                                  "seed-0 initialisation)")
    p.add_argument("--on", default="dense", metavar="METHOD",
                   help="the method the variants are added to and measured against (default: dense, i.e. the exact "
                        "gradient; e.g. swat-u90)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--data-dir", default=None, help="where cifar10 lies (default: $LEANPROP_DATA)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/blpa_grad_error.jsonl"))
    p.add_argument("--no-save", action="store_true")
    p.set_defaults(bench_run=run)


def _flat_grad(model, x, y, seed: int):
    """All parameter gradients of one step as one float64 vector (float64: a float32 cosine over ten million
    entries is off by ~1e-3). The RNG is seeded for the step, so dropout draws the same masks for every net."""
    import torch
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1).double() for p in model.parameters() if p.grad is not None])


def measure(model, batches, variants: dict[str, dict], on: str = "dense") -> dict[str, dict]:
    """``{variant: {cos, cos_min, rel_err, drift}}`` of each BLPA variant's gradient on each ``(x, y)`` of
    ``batches`` against the gradient of ``model`` under ``on`` alone (a method spec; ``"dense"``: the exact
    gradient); ``model`` is left unconverted (the reference and each variant convert a copy)."""
    import copy

    import torch
    import torch.nn.functional as F

    from leanprop.blpa.config import BLPAConfig
    from leanprop.methods import parse_method
    from leanprop.nn.convert import convert_

    base = parse_method(on)
    if any(isinstance(c, BLPAConfig) for c in base):
        raise ValueError(f"--on {on!r} already holds BLPA; name the method the BLPA variants are added to "
                         "(e.g. dense or swat-u90)")
    model.train()
    reference = copy.deepcopy(model)
    if base:
        convert_(reference, copy.deepcopy(base))
    nets = {}
    for name, kw in variants.items():
        nets[name] = copy.deepcopy(model)
        convert_(nets[name], [*copy.deepcopy(base), BLPAConfig(**kw)])
    cos = {n: [] for n in nets}
    rel = {n: [] for n in nets}
    diff = dict.fromkeys(nets, 0.0)
    norms = 0.0
    for i, (x, y) in enumerate(batches):
        g0 = _flat_grad(reference, x, y, seed=i)
        norms += float(g0.norm())
        for name, net in nets.items():
            g = _flat_grad(net, x, y, seed=i)
            d = g - g0
            cos[name].append(float(F.cosine_similarity(g, g0, dim=0)))
            rel[name].append(float(d.norm() / g0.norm()))
            diff[name] = diff[name] + d
    n = max(len(cos[next(iter(nets))]) if nets else 0, 1)
    return {name: {"cos": sum(cos[name]) / n, "cos_min": min(cos[name]), "rel_err": sum(rel[name]) / n,
                   "drift": float(torch.as_tensor(diff[name]).norm()) / n / (norms / n)} for name in nets}


def run(a: argparse.Namespace) -> int:
    import itertools

    import torch

    from leanprop import models
    from leanprop.config import DataConfig
    from leanprop.data.build import build_data
    from leanprop.utils import append_jsonl, run_context

    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"unknown variant(s) {', '.join(unknown)}: use {', '.join(VARIANTS)}")
        return 2
    from leanprop.methods import format_method, parse_method

    try:
        on = format_method(parse_method(a.on))
    except ValueError as e:
        print(f"--on: {e}")
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    data = build_data(DataConfig(name="cifar10", root=a.data_dir, batch_size=a.batch), seed=0, progress=False)
    torch.manual_seed(0)
    model = models.create(a.model, num_classes=data.num_classes)
    state = "init (seed 0)"
    if a.checkpoint is not None:
        ck = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        state = f"{a.checkpoint.parent.name}, epoch {ck.get('epoch', '?')}"
    batches = list(itertools.islice(iter(data.train), a.batches))
    try:
        got = measure(model, batches, {n: VARIANTS[n] for n in names}, on=on)
    except ValueError as e:
        print(e)
        return 2
    env, stamp = run_context()
    records = [{"bench": KIND, "model": a.model, "state": state, "on": on, "variant": n, "config": VARIANTS[n],
                "batches": len(batches), "batch": a.batch, **got[n], **env, "timestamp": stamp} for n in names]
    print(f"{a.model}, {state}, {len(batches)} batches of {a.batch}; against {on} alone")
    print(f"{'variant':16s} {'cos':>7s} {'worst':>7s} {'rel.err':>8s} {'drift':>7s}")
    for r in records:
        print(f"{r['variant']:16s} {r['cos']:7.4f} {r['cos_min']:7.4f} {r['rel_err']:8.3f} {r['drift']:7.3f}")
    if not a.no_save:
        append_jsonl(a.out, records)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``leanprop bench blpa_grad_error ARGV`` (``benchmarks/blpa_grad_error.py``)."""
    from leanprop.bench import script_main

    return script_main(KIND, argv)
