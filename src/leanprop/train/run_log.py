"""Run-directory outputs: resolved config, environment record, per-epoch metrics CSV, optional TensorBoard."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import yaml

from leanprop.utils import atomic_write_text

METRIC_FIELDS = [
    "epoch", "step", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5",
    "val_loss", "val_top1", "val_top5", "epoch_seconds", "train_images_per_s", "data_images_per_s",
    "weight_sparsity", "act_sparsity",
]


def write_config(run_dir: Path, cfg_dict: dict) -> None:
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg_dict, sort_keys=False))


def write_env(run_dir: Path, env: dict) -> None:
    atomic_write_text(run_dir / "env.json", json.dumps(env, indent=2) + "\n")


class MetricsCSV:
    """Append-only per-epoch metrics; on resume, rows after the checkpoint's epoch are dropped."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, epoch: int) -> None:
        rows = self.read()
        kept = [r for r in rows if int(r["epoch"]) <= epoch]
        self._write_all(kept)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def _write_all(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
        atomic_write_text(self.path, buf.getvalue())

    def append(self, row: dict) -> None:
        rows = self.read()
        rows.append({k: _fmt(row.get(k)) for k in METRIC_FIELDS})
        self._write_all(rows)


def _fmt(v: object) -> object:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


class TensorBoard:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("train.tensorboard=true needs TensorBoard: pip install 'leanprop[tb]'") from e
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))

    def log(self, row: dict, step: int) -> None:
        for k, v in row.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
