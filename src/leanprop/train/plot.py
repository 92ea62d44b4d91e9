"""``leanprop plot RUN_DIR``: loss and accuracy curves from a run's metrics.csv, drawn to PNG."""

from __future__ import annotations

import os
from pathlib import Path

from leanprop.train.run_log import MetricsCSV


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key, "")
        if v not in ("", None):
            xs.append(float(r["epoch"]))
            ys.append(float(v))
    return xs, ys


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    run_dir = Path(run_dir)
    rows = MetricsCSV(run_dir / "metrics.csv").read()
    if not rows:
        raise FileNotFoundError(f"{run_dir / 'metrics.csv'} is missing or empty: is {run_dir} a leanprop run dir "
                                "with at least one finished epoch?")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val"), ("test_loss", "test")):
        xs, ys = _series(rows, key)
        if xs:
            ax_l.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
    for key, label in (("train_top1", "train top-1"), ("val_top1", "val top-1"), ("test_top1", "test top-1"),
                       ("test_top5", "test top-5")):
        xs, ys = _series(rows, key)
        if xs:
            ax_a.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
    ax_l.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_a.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
