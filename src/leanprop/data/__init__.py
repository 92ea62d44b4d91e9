"""Datasets and deterministic, rank-sharded loaders.

Entry point: :func:`build_data` turns a :class:`~leanprop.config.DataConfig` into a :class:`DataBundle`
of train / val / test loaders. Datasets: ``cifar10`` / ``cifar100`` (python pickles, optionally
downloaded; CIFAR-10 also from the shared JPEG archive, decoded once and cached), ``npz``, ``folder``,
``imagenet`` and ``synthetic`` (smoke tests only).

Every loader yields ``(images, labels)``: float32 NCHW normalised images and int64 labels on the CPU.
The batches of epoch ``e`` depend only on ``(seed, e, rank, world_size)``, so a run resumed at an epoch
boundary sees bit-identical data.
"""

from leanprop.data.arrays import ArraySplits
from leanprop.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
)
from leanprop.data.build import DataBundle, build_data, val_partition
from leanprop.data.loaders import FileLoader, Loader, TensorLoader
from leanprop.data.paths import resolve_data_root
from leanprop.utils import cache_dir

__all__ = [
    "ArraySplits",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DataBundle",
    "FileLoader",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Loader",
    "TensorLoader",
    "build_data",
    "cache_dir",
    "resolve_data_root",
    "val_partition",
]
