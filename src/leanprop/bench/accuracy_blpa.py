"""The ``blpa`` suite of ``leanprop bench accuracy``: BLPA accuracy on CIFAR-10, dense vs BLPA-8, BLPA-4, BLPA-2 and
SWAT-U90 + BLPA-4, on the recipe of the ``swat`` suite (so the two tables share one dense run), same model, seed,
data and epochs; each run resumable (``--resume auto``), so the matrix can be trained in pieces across sessions.
Writes ``docs/results/blpa.md`` (another model: ``docs/results/blpa_<model>.md``) from whatever the runs have
finished so far.

    leanprop bench accuracy --suite blpa --out-dir runs/accuracy      # resnet20: train what is missing, then report
    leanprop bench accuracy --suite blpa --model mobilenet_v2 --only dense blpa4
    leanprop bench accuracy --suite blpa --out-dir runs/accuracy --report-only
    leanprop bench accuracy --suite blpa --only dense blpa4 blpa2 --seeds 1   # a second seed of these rows

The default model is the post-activation ``resnet20`` (BN -> add -> ReLU blocks, ReLU through one module used
twice), whose BN -> ReLU -> conv runs BLPA finds from the computation (docs/methods/blpa.md).
Every row of the report shows the exact ``leanprop train`` command that produced it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from leanprop.bench import accuracy_swat
from leanprop.bench.accuracy import Matrix, read_rows

BASE = accuracy_swat.BASE
SWAT_U90 = accuracy_swat.VARIANTS["swat-u90"][1:]  # its sparsity, distribution and Top-K period
VARIANTS = {
    "dense": [],
    "blpa8": ["method.name=blpa", "blpa.bits=8"],
    "blpa4": ["method.name=blpa", "blpa.bits=4"],
    "blpa2": ["method.name=blpa", "blpa.bits=2"],
    "swat-u90+blpa4": ["method.name=swat+blpa", *SWAT_U90, "blpa.bits=4"],
    # where BLPA-4's gap comes from: the BN codes alone (every other tensor kept as PyTorch keeps it: the paper's
    # scope; the virtual BN units are part of the storage policy, so it stays on for batch_norm only), and the codes
    # rounded stochastically (unbiased) instead of to the nearest level
    "blpa4-units": ["method.name=blpa", "blpa.bits=4", "blpa.codec_bits=32", "blpa.policy={batch_norm: 4}"],
    "blpa4-sr": ["method.name=blpa", "blpa.bits=4", "blpa.stochastic=true"],
}
PLANNED = {"resnet20": ["dense", "blpa8", "blpa4", "blpa2", "swat-u90+blpa4"], "mobilenet_v2": ["dense", "blpa4"]}
common = accuracy_swat.common


def resolved(name: str, model: str, epochs: int):
    """The RunConfig a variant's command trains (its config, relative to the working directory, plus the
    overrides)."""
    from leanprop import config as C

    config, sets = MATRIX.variants[name]
    return C.load(Path(config), [*common(model, epochs), *sets])


def intro(model: str, epochs: int) -> str:
    from leanprop.blpa.config import BLPAConfig

    b = resolved("blpa4", model, epochs).blpa or BLPAConfig()
    return (accuracy_swat.recipe(model, epochs) + " `dense` is plain PyTorch training of the same model (the `dense` "
            "run of the SWAT table); `blpaK` keeps K-bit codes of every BatchNorm input (BLPA's quantizer, "
            f"{b.mode} mode, +-{b.window:g} std window; forward exact), rebuilds the BN outputs, the ReLU outputs "
            "after them and the residual sums from those codes and 1-bit masks, and keeps every other saved float "
            "tensor as the 'outside units' column says (the storage policy of docs/methods/blpa.md; stochastic "
            "rounding at 2 bits); `swat-u90+blpa4`: SWAT-U90 (Top-K period 10) and BLPA-4 on one model; "
            "`blpa4-units` (BN codes only, every other tensor kept as PyTorch keeps it: the paper's scope) and "
            "`blpa4-sr` (every code rounded stochastically) locate BLPA-4's gap. Time per "
            "epoch: the median wall-clock seconds of the run's epochs on the machine that trained it, indicative only "
            "(a run may share the machine with other jobs; controlled timings are in docs/benchmarks.md). Generated "
            "by `leanprop bench accuracy --suite blpa`; each row's command is below the table.")


def _blpa_section(d: Path) -> dict | None:
    """The run's resolved ``blpa:`` settings from its config.yaml ({} for a dense run, None without a config)."""
    import yaml

    f = d / "config.yaml"
    if not f.exists():
        return None
    cfg = yaml.safe_load(f.read_text()) or {}
    return {} if cfg.get("method", {}).get("name") == "dense" else (cfg.get("blpa") or {"bits": 4})


def stored(d: Path, name: str, last: dict) -> str:
    """What the run kept of each BatchNorm input (a fused unit's activation before the storage policy), from its
    resolved config.yaml."""
    b = _blpa_section(d)
    if not b:
        return "" if b is None else "as PyTorch (exact)"
    bits = b.get("bits", 4)
    return "fp32 + 1-bit mask (lossless)" if bits == 32 else f"{bits}-bit codes"


def outside(d: Path, name: str, last: dict) -> str:
    """How the run kept the saved tensors outside the fused units, from its resolved config.yaml (runs from before
    the storage policy had an 8-bit codec whatever ``bits`` said)."""
    b = _blpa_section(d)
    if not b:
        return "" if b is None else "as PyTorch"
    if "codec" not in b:  # before the storage policy
        return "as they are" if b.get("codec_bits", 8) is None else f"{b.get('codec_bits', 8)}-bit codec"
    if not b["codec"]:
        return "as they are"
    width = b.get("codec_bits") or b.get("bits", 4)
    if width == 32:
        coded = ", ".join(f"{k} {v}-bit" for k, v in (b.get("policy") or {}).items())
        return "as PyTorch" + (f" except {coded} (the paper's scope)" if coded else " (codec off)")
    stochastic = b.get("stochastic")
    stochastic = width <= 2 if stochastic is None else stochastic
    return f"storage policy, {width}-bit codes" + (" (stochastic)" if stochastic else "")


def epoch_seconds(d: Path, name: str, last: dict) -> str:
    secs = [float(r["epoch_seconds"]) for r in read_rows(d) if r.get("epoch_seconds")]
    return f"{statistics.median(secs):.0f} s" if secs else ""


MATRIX = Matrix(
    title="BLPA accuracy on CIFAR-10",
    variants={name: (BASE, sets) for name, sets in VARIANTS.items()},
    common=common,
    intro=intro,
    columns=[("BN inputs kept as", stored), ("outside units", outside),
             ("measured W / X sparsity", accuracy_swat.measured_sparsity), ("time/epoch (median)", epoch_seconds)],
    planned=PLANNED,
    default_model="resnet20",
    default_epochs=30,
    default_report=Path("docs") / "results" / "blpa.md",
)
command = MATRIX.command
run_dir = MATRIX.run_dir
report = MATRIX.report


def main(argv: list[str] | None = None) -> int:
    """``leanprop bench accuracy --suite blpa ARGV`` (``benchmarks/blpa_accuracy.py``)."""
    from leanprop.bench import script_main

    return script_main("accuracy", argv, fixed=("--suite", "blpa"))
