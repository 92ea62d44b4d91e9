"""``leanprop flops``: analytic training/inference FLOPs of a dense or SWAT model (Raihan & Aamodt 2020).

Example::

    leanprop flops --model vgg16 --dataset cifar10 --swat erk --sparsity 0.95
    leanprop flops --model vgg16 --dataset cifar10 --method swat-erk95          # the same, as a method spec

Only ``argparse`` is imported at module level so that ``leanprop --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_parser", "run", "resolve_model", "DATASETS", "PAPER_REDUCTIONS"]

#: dataset -> (input shape without batch, number of classes, model family)
DATASETS: dict[str, tuple[tuple[int, int, int], int, str]] = {
    "cifar10": ((3, 32, 32), 10, "cifar"),
    "cifar100": ((3, 32, 32), 100, "cifar"),
    "imagenet": ((3, 224, 224), 1000, "imagenet"),
}

_SWAT = {"none": None, "dense": None, "u": "uniform", "uniform": "uniform", "erk": "erk",
         "m": "momentum", "momentum": "momentum"}

#: Reported FLOP reductions in % (Raihan & Aamodt 2020 result tables, as listed in the official README):
#: (model, distribution, sparsity, structure) -> (training, inference); None where the paper gives none.
#: CIFAR rows are CIFAR-10.
PAPER_REDUCTIONS: dict[tuple[str, str, float, str | None], tuple[float | None, float | None]] = {
    ("cifar_vgg16", "uniform", 0.9, None): (89.7, None),
    ("cifar_vgg16", "erk", 0.95, None): (89.5, None),
    ("cifar_vgg16", "momentum", 0.95, None): (64.0, None),
    ("wrn16_8", "uniform", 0.9, None): (90.0, None),
    ("wrn16_8", "erk", 0.95, None): (91.4, None),
    ("wrn16_8", "momentum", 0.95, None): (86.3, None),
    ("cifar_densenet121", "uniform", 0.9, None): (89.8, None),
    ("cifar_densenet121", "erk", 0.9, None): (89.7, None),
    ("cifar_densenet121", "momentum", 0.9, None): (84.2, None),
    ("cifar_resnet18", "uniform", 0.5, "channel"): (49.9, None),
    ("cifar_resnet18", "uniform", 0.6, "channel"): (59.8, None),
    ("cifar_resnet18", "uniform", 0.7, "channel"): (69.8, None),
    ("cifar_densenet121", "uniform", 0.5, "channel"): (49.9, None),
    ("cifar_densenet121", "uniform", 0.6, "channel"): (59.9, None),
    ("cifar_densenet121", "uniform", 0.7, "channel"): (69.9, None),
    ("resnet50", "uniform", 0.8, None): (76.1, 77.7),
    ("resnet50", "uniform", 0.9, None): (85.6, 87.4),
    ("resnet50", "erk", 0.8, None): (60.0, 58.9),
    ("resnet50", "erk", 0.9, None): (79.0, 77.8),
    ("resnet50", "momentum", 0.8, None): (45.9, 45.0),
    ("resnet50", "momentum", 0.9, None): (65.4, 64.8),
    ("resnet50", "uniform", 0.5, "channel"): (47.6, 48.6),
    ("resnet50", "uniform", 0.6, "channel"): (57.1, 58.3),
    ("resnet50", "uniform", 0.7, "channel"): (66.6, 68.0),
    ("wide_resnet50_2", "uniform", 0.8, None): (78.6, None),
    ("wide_resnet50_2", "uniform", 0.9, None): (88.4, None),
    ("wide_resnet50_2", "uniform", 0.5, "channel"): (49.1, None),
    ("wide_resnet50_2", "uniform", 0.6, "channel"): (58.9, None),
    ("wide_resnet50_2", "uniform", 0.7, "channel"): (68.7, None),
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``flops`` sub-command on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    f = subparsers.add_parser("flops", help="analytic training/inference FLOPs of a dense or SWAT model",
                              description="Per-layer MACs and the training/inference FLOP reduction of SWAT "
                                          "(docs/methods/swat.md, 'FLOP accounting'), plus an ideal "
                                          "sparse-accelerator speed-up.")
    f.add_argument("--model", required=True,
                   help="registry name, or a short name resolved by dataset (vgg16, densenet121, resnet18 -> cifar_*)")
    f.add_argument("--dataset", choices=sorted(DATASETS),
                   help="sets input shape and classes (default: cifar10 or imagenet, from the model family)")
    f.add_argument("--method", metavar="SPEC",
                   help="a method spec (swat-erk95, swat-channel50, swat-u90+blpa4...; `leanprop bench --help`): "
                        "its SWAT config sets --swat, --sparsity and --structure; other methods count as dense")
    f.add_argument("--swat", default="none", type=str.lower, choices=sorted(_SWAT),
                   help="budget distribution: none (dense), uniform/u, erk, momentum/m (M: its uniform start)")
    f.add_argument("--sparsity", type=float, default=0.9, help="SWAT sparsity s (density d = 1 - s)")
    f.add_argument("--structure", choices=["channel", "filter"], help="structured weight Top-K")
    f.add_argument("--first-layer", dest="first_layer", action=argparse.BooleanOptionalAction, default=None,
                   help="sparsify the first layer (default: official configs — dense for U/structured)")
    f.add_argument("--last-layer", dest="last_layer", action=argparse.BooleanOptionalAction, default=None,
                   help="sparsify the last layer (default: yes)")
    f.add_argument("--override", action="append", default=[], metavar="LAYER=S",
                   help="per-layer sparsity, layer name or regular expression (repeatable)")
    f.add_argument("--batch", type=int, default=1, help="batch of the counting forward pass (counts are per sample)")
    f.add_argument("--skip-input-grad", action="store_true",
                   help="do not count the first layer's grad-input (the image needs no gradient)")
    f.add_argument("--max-rows", type=int, help="show only the N layers with the most MACs")
    f.add_argument("--json", action="store_true", help="print the report as JSON")
    return f


def resolve_model(name: str, dataset: str | None) -> tuple[str, str]:
    """``(registry name, dataset)`` for a model name that may be short (``vgg16`` + cifar -> ``cifar_vgg16``).

    With a CIFAR dataset ``cifar_<name>`` wins when it exists; otherwise the name must be registered as is.
    Without a dataset the model family picks cifar10 or imagenet.  Unknown names raise ``ValueError``.
    """
    from leanprop import models

    known = set(models.list_models())
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; use one of {', '.join(sorted(DATASETS))}")
    family = DATASETS[dataset][2] if dataset else None
    candidates = ([f"cifar_{name}"] if family in (None, "cifar") else []) + [name]
    if family is None and name in known:
        candidates = [name]
    resolved = next((c for c in candidates if c in known), None)
    if resolved is None:
        raise ValueError(f"unknown model {name!r} for dataset {dataset or 'any'}; available models: "
                         f"{', '.join(sorted(known))} (short names vgg16, densenet121, resnet18 map to cifar_* "
                         "with a CIFAR dataset)")
    model_family = models.model_info(resolved).family
    if dataset is None:
        dataset = "cifar10" if model_family == "cifar" else "imagenet"
    elif model_family != DATASETS[dataset][2]:
        raise ValueError(f"model {resolved!r} is a {model_family} model but --dataset {dataset} needs a "
                         f"{DATASETS[dataset][2]} model; available: "
                         f"{', '.join(models.list_models(DATASETS[dataset][2]))}")
    return resolved, dataset


def _parse_overrides(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.rpartition("=")
        if not sep or not key:
            raise ValueError(f"--override expects LAYER=SPARSITY, got {item!r}")
        out[key] = float(value)
    return out


def _apply_method_spec(args: argparse.Namespace) -> None:
    """``--method``: the SWAT preset of the spec as ``--swat/--sparsity/--structure`` (dense without one)."""
    from leanprop.methods import parse_method
    from leanprop.swat.config import SWATConfig

    swat = [c for c in parse_method(args.method) if isinstance(c, SWATConfig)]
    args.swat = swat[0].distribution if swat else "none"
    if swat:
        args.sparsity, args.structure = swat[0].sparsity, swat[0].structure


def run(args: argparse.Namespace) -> int:
    """Run ``leanprop flops``; prints the table, totals, reductions and accelerator estimate. Returns 0."""
    from leanprop import models
    from leanprop.swat.config import SWATConfig

    from .accelerator import estimate_speedup, format_speedup
    from .flops import count_flops, swat_densities

    name, dataset = resolve_model(args.model, args.dataset)
    shape, classes, _ = DATASETS[dataset]
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    model = models.create(name, num_classes=classes)
    if args.method is not None:
        _apply_method_spec(args)
    distribution = _SWAT[args.swat]
    cfg = None
    densities: dict[str, tuple[float, float]] = {}
    if distribution is not None:
        cfg = SWATConfig(sparsity=args.sparsity, distribution=distribution, structure=args.structure,
                         sparsify_first_layer=args.first_layer, sparsify_last_layer=args.last_layer,
                         overrides=_parse_overrides(args.override))
        densities = swat_densities(model, cfg)
    report = count_flops(model, (args.batch, *shape), densities,
                         count_first_grad_input=not args.skip_input_grad, model_name=name)
    sparsity = args.sparsity if distribution == "uniform" and not args.override else None
    est = estimate_speedup(report, sparsity=sparsity)
    paper = PAPER_REDUCTIONS.get((name, distribution, args.sparsity, args.structure)) if cfg else None

    if args.json:
        out = report.to_dict()
        out.update(dataset=dataset, swat=None if cfg is None else vars(cfg).copy(), accelerator=est,
                   paper_reduction_percent=None if paper is None else {"training": paper[0], "inference": paper[1]})
        print(json.dumps(out, indent=2, default=str))
        return 0
    what = "dense" if cfg is None else (
        f"SWAT {distribution} s={args.sparsity}" + (f", {args.structure}" if args.structure else "")
        + f", first layer {'sparse' if cfg.first_layer_sparse else 'dense'}, "
          f"last layer {'sparse' if cfg.last_layer_sparse else 'dense'}")
    print(f"{name} on {dataset} ({what})")
    if distribution == "momentum":
        print("note: SWAT-M's budget moves during training; this is its uniform starting budget")
    print(report.table(max_rows=args.max_rows))
    if paper is not None:
        ptrain, pinf = paper
        which = " (its trained SWAT-M budget)" if distribution == "momentum" else ""
        print(f"paper{which}: training FLOP reduction {ptrain if ptrain is not None else '-'} %, "
              f"inference {pinf if pinf is not None else '-'} %  (ours: {100 * report.training_reduction:.1f} / "
              f"{100 * report.inference_reduction:.1f} %)")
    print(format_speedup(est))
    return 0
