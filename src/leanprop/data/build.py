"""``build_data``: from a :class:`~leanprop.config.DataConfig` to train / val / test loaders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from leanprop.config import DataConfig
from leanprop.data.arrays import ArraySplits
from leanprop.data.cifar import load_cifar
from leanprop.data.datasets import (
    load_folder_arrays,
    load_npz,
    make_synthetic,
    scan_folder,
    small_image_format,
)
from leanprop.data.loaders import FileLoader, Loader, TensorLoader
from leanprop.data.paths import resolve_data_root
from leanprop.data.transforms import imagenet_eval_transform, imagenet_train_transform

VAL_SPLIT_SEED = 0  # the held-out validation images are the same for every run seed


@dataclass
class DataBundle:
    """What the training loop gets: loaders plus the facts a model needs."""

    train: Loader
    test: Loader
    val: Loader | None
    num_classes: int
    image_size: int  # height of the (square) images the model sees
    in_channels: int
    description: str  # one line for logs, e.g. "CIFAR-10 from JPEG archive ... (50000 train / 10000 test)"
    classes: list[str] = field(default_factory=list)


def val_partition(n: int, val_split: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Training and validation indices (both ascending): the validation set is the LAST ``val_split``
    entries of a fixed permutation (seed :data:`VAL_SPLIT_SEED`, independent of the run seed)."""
    if val_split <= 0:
        return np.arange(n), None
    if val_split >= n:
        raise ValueError(f"data.val_split={val_split} leaves no training images (the training set has {n})")
    g = torch.Generator()
    g.manual_seed(VAL_SPLIT_SEED)
    perm = torch.randperm(n, generator=g).numpy()
    return np.sort(perm[: n - val_split]), np.sort(perm[n - val_split:])


def _limit(idx: np.ndarray, limit: int | None, key: str) -> np.ndarray:
    if limit is None:
        return idx
    if limit < 1:
        raise ValueError(f"data.{key} must be >= 1 (or null for no limit), got {limit}")
    return idx[:limit]


def _split_indices(cfg: DataConfig, n_train: int, n_test: int):
    train_idx, val_idx = val_partition(n_train, cfg.val_split)
    train_idx = _limit(train_idx, cfg.limit_train, "limit_train")
    if val_idx is not None:
        val_idx = _limit(val_idx, cfg.limit_eval, "limit_eval")
    test_idx = _limit(np.arange(n_test), cfg.limit_eval, "limit_eval")
    return train_idx, val_idx, test_idx


def _take(a, idx: np.ndarray, n: int):
    """``a[idx]`` without a copy when idx is a prefix ``0..k-1`` (the common case)."""
    if len(idx) == 0 or (idx[0] == 0 and idx[-1] == len(idx) - 1):
        return a[: len(idx)]
    if isinstance(a, list):
        return [a[i] for i in idx]
    return a[idx]


def _counts(train_idx, val_idx, test_idx) -> str:
    parts = [f"{len(train_idx)} train"]
    if val_idx is not None:
        parts.append(f"{len(val_idx)} val")
    parts.append(f"{len(test_idx)} test")
    return " / ".join(parts)


def _bundle_from_arrays(a: ArraySplits, cfg: DataConfig, seed: int, rank: int, world_size: int) -> DataBundle:
    train_idx, val_idx, test_idx = _split_indices(cfg, len(a.x_train), len(a.x_test))
    common = {"mean": a.mean, "std": a.std, "seed": seed, "rank": rank, "world_size": world_size}
    n = len(a.x_train)
    train = TensorLoader(_take(a.x_train, train_idx, n), _take(a.y_train, train_idx, n), cfg.batch_size,
                         train=True, augment=cfg.augment, **common)
    k = len(test_idx)
    test = TensorLoader(a.x_test[:k], a.y_test[:k], cfg.eval_batch_size, train=False, **common)
    val = None
    if val_idx is not None:
        val = TensorLoader(a.x_train[val_idx], a.y_train[val_idx], cfg.eval_batch_size, train=False, **common)
    _, h, _, c = a.x_train.shape
    return DataBundle(train, test, val, a.num_classes, h, c,
                      f"{a.source} ({_counts(train_idx, val_idx, test_idx)})", list(a.classes))


def _image_root(cfg: DataConfig) -> Path:
    if cfg.path:
        return Path(cfg.path).expanduser()
    root = resolve_data_root(cfg.root)
    if cfg.name == "imagenet" and not (root / "train").is_dir() and (root / "imagenet" / "train").is_dir():
        return root / "imagenet"
    return root


def _bundle_from_files(cfg: DataConfig, seed: int, rank: int, world_size: int, progress: bool) -> DataBundle:
    test_splits = ("val", "test") if cfg.name == "imagenet" else ("test", "val")
    fs = scan_folder(_image_root(cfg), test_splits)
    if cfg.name == "folder":
        shape = small_image_format(fs.train + fs.test)
        if shape is not None:  # small images: decode once, then the fast in-memory path
            return _bundle_from_arrays(load_folder_arrays(fs, shape, progress=progress), cfg, seed, rank,
                                       world_size)
    train_idx, val_idx, test_idx = _split_indices(cfg, len(fs.train), len(fs.test))
    train_tf = (imagenet_train_transform(cfg.image_size) if cfg.augment
                else imagenet_eval_transform(cfg.image_size, cfg.resize_size))
    eval_tf = imagenet_eval_transform(cfg.image_size, cfg.resize_size)
    common = {"seed": seed, "rank": rank, "world_size": world_size, "workers": cfg.workers}
    n = len(fs.train)
    train = FileLoader(_take(fs.train, train_idx, n), cfg.batch_size, transform=train_tf, train=True,
                       **common)
    test = FileLoader(fs.test[: len(test_idx)], cfg.eval_batch_size, transform=eval_tf, train=False,
                      **common)
    val = None
    if val_idx is not None:
        val = FileLoader([fs.train[i] for i in val_idx], cfg.eval_batch_size, transform=eval_tf, train=False,
                         **common)
    title = "ImageNet" if cfg.name == "imagenet" else "image folder"
    test_note = "" if fs.test_split == "test" else f", test = {fs.test_split}/"
    desc = (f"{title} {fs.root} streamed from disk ({_counts(train_idx, val_idx, test_idx)}{test_note}; "
            f"{len(fs.classes)} classes, {cfg.image_size}px crops, ImageNet normalisation)")
    return DataBundle(train, test, val, len(fs.classes), cfg.image_size, 3, desc, list(fs.classes))


def build_data(cfg: DataConfig, *, seed: int = 0, rank: int = 0, world_size: int = 1,
               progress: bool = True) -> DataBundle:
    """Build the loaders described by ``cfg`` for this process (``rank`` of ``world_size``).

    Batches depend only on ``(seed, epoch, rank, world_size)``; see :mod:`leanprop.data.loaders`.
    Raises FileNotFoundError (saying what to put where) when the data is missing, ValueError for data or
    settings that cannot work. ``progress`` shows download/decode bars (on rank 0 only).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in range for world_size {world_size}")
    progress = progress and rank == 0
    name = cfg.name
    if name in ("cifar10", "cifar100"):
        arrays = load_cifar(resolve_data_root(cfg.root), name, source=cfg.source, download=cfg.download,
                            progress=progress)
    elif name == "npz":
        if not cfg.path:
            raise ValueError("data.name=npz needs data.path: the .npz file with x_train, y_train, x_test, "
                             "y_test")
        arrays = load_npz(cfg.path)
    elif name == "synthetic":
        arrays = make_synthetic(cfg.synthetic_train, cfg.synthetic_test, cfg.synthetic_classes,
                                cfg.synthetic_size)
    elif name in ("folder", "imagenet"):
        return _bundle_from_files(cfg, seed, rank, world_size, progress)
    else:
        raise ValueError(f"unknown dataset data.name={name!r}: use cifar10, cifar100, npz, folder, imagenet "
                         "or synthetic")
    return _bundle_from_arrays(arrays, cfg, seed, rank, world_size)

