"""Deterministic, rank-sharded loaders.

The training loop relies only on this interface: iterating yields ``(images, labels)`` (float32 NCHW
normalised, int64) on the CPU; ``len(loader)`` is the number of batches this rank sees per epoch;
``set_epoch(e)`` selects the epoch; ``num_samples`` / ``dataset_size`` give the sizes.

Order and augmentation of epoch ``e`` are a pure function of ``(seed, e, rank, world_size)``:

* training: one permutation from a ``torch.Generator`` seeded with ``seed + epoch`` (the same on every
  rank), padded to a multiple of ``world_size`` by repeating its start, and rank ``r`` takes every
  ``world_size``-th entry from ``r`` on (the rule of ``torch.utils.data.DistributedSampler``). The last
  batch may be partial.
* evaluation: no shuffling, no augmentation, no padding: rank ``r`` takes ``range(r, N, world_size)``,
  so counts summed over ranks are exact.
"""

from __future__ import annotations

import math
import random
import weakref
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from leanprop.data.augment import Normalize, PadCropFlip, crop_flip_params

# stream ids for derived seeds, so augmentation and per-sample transform seeds never share a stream
_STREAM_AUGMENT = 1
_STREAM_SAMPLE_SEEDS = 2
_STREAM_WORKERS = 3


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (e.g. seed, epoch, rank, stream); stable across platforms."""
    words = [int(p) % (1 << 64) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1


def train_shard(n: int, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's training indices for ``epoch`` (shuffled, padded, strided; see the module docstring)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)
    total = math.ceil(n / world_size) * world_size
    if total > n:
        reps = math.ceil(total / n)
        perm = perm.repeat(reps)[:total] if reps > 1 else torch.cat([perm, perm[: total - n]])
    return perm[rank:total:world_size]


def eval_shard(n: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's evaluation indices: ``range(rank, n, world_size)`` (no padding)."""
    return torch.arange(rank, n, world_size)


class Loader:
    """Base class: sharding, epoch bookkeeping and ``len``. Subclasses implement ``__iter__``."""

    def __init__(self, dataset_size: int, batch_size: int, *, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in range for world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dataset_size < 1:
            raise ValueError("the dataset is empty")
        self.dataset_size = int(dataset_size)
        self.batch_size = int(batch_size)
        self.train = train
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        if train:
            self.num_samples = math.ceil(self.dataset_size / self.world_size)
        else:
            self.num_samples = len(range(self.rank, self.dataset_size, self.world_size))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle and augmentation the next iteration produces."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> torch.Tensor:
        """Dataset indices this rank visits in the current epoch, in order."""
        if self.train:
            return train_shard(self.dataset_size, self.seed, self.epoch, self.rank, self.world_size)
        return eval_shard(self.dataset_size, self.rank, self.world_size)

    def augment_generator(self) -> torch.Generator:
        """Generator for this (seed, epoch, rank)'s random augmentation."""
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, self.epoch, self.rank, _STREAM_AUGMENT))
        return g

    def __repr__(self) -> str:
        kind = "train" if self.train else "eval"
        return (f"{type(self).__name__}({kind}, {self.dataset_size} images, batch {self.batch_size}, "
                f"rank {self.rank}/{self.world_size}, {len(self)} batches)")


class TensorLoader(Loader):
    """Batches from NHWC uint8 images held in memory (CIFAR, npz, small folders, synthetic).

    With ``augment`` (training only), each sample gets a random pad-``pad`` crop and horizontal flip,
    computed for the whole batch at once by :class:`~leanprop.data.augment.PadCropFlip`.
    """

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                 batch_size: int, *, mean: Sequence[float], std: Sequence[float], train: bool,
                 augment: bool = False, pad: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(len(images), batch_size, train=train, seed=seed, rank=rank, world_size=world_size)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = torch.as_tensor(np.ascontiguousarray(images))
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"expected NHWC uint8 images, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        self.labels = torch.as_tensor(np.asarray(labels)).to(torch.int64)
        self.normalize = Normalize(tuple(mean), tuple(std))
        self.augment = bool(augment and train)
        self.pad = int(pad)
        self._cropper: PadCropFlip | None = None  # built on first use (the padded copy costs memory)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        n, bs = idx.numel(), self.batch_size
        if self.augment:
            if self._cropper is None:
                self._cropper = PadCropFlip(self.images, self.pad)
            dy, dx, flip = crop_flip_params(n, self.pad, self.augment_generator())
        contiguous = not self.train and self.world_size == 1  # eval on one process: plain slices
        for s in range(0, n, bs):
            b = idx[s:s + bs]
            if self.augment:
                u8 = self._cropper(b, dy[s:s + bs], dx[s:s + bs], flip[s:s + bs])
            elif contiguous:
                u8 = self.images[s:s + bs]
            else:
                u8 = self.images[b]
            yield self.normalize(u8), self.labels[b]


class _FileDataset(torch.utils.data.Dataset):
    """(path, label) samples decoded with PIL; items are ``(index, sample_seed)`` pairs from the sampler."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, sample_seed = item
        path, label = self.samples[index]
        with Image.open(path) as im:
            img = im.convert("RGB")
        return self.transform(img, random.Random(sample_seed)), label


class _EpochSampler:
    """Yields ``(index, sample_seed)`` for the owning loader's current epoch (runs in the main process)."""

    def __init__(self, loader: FileLoader):
        # a weak reference: a loader <-> sampler cycle would leave the DataLoader's worker processes to the
        # cyclic garbage collector, whose teardown order makes their shutdown wait for a 5 s timeout
        self._loader = weakref.ref(loader)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        loader = self._loader()
        idx = loader.indices()
        seeds = torch.randint(0, 1 << 62, (idx.numel(),), generator=loader.sample_seed_generator())
        return iter(zip(idx.tolist(), seeds.tolist(), strict=True))

    def __len__(self) -> int:
        return self._loader().num_samples


class FileLoader(Loader):
    """Streams images from disk through PIL transforms in a ``torch.utils.data.DataLoader``.

    Each sample's random transform is seeded from ``(seed, epoch, rank)`` and its position in the epoch, so
    batches do not depend on the number of workers or their scheduling.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], batch_size: int, *, transform, train: bool,
                 workers: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(len(samples), batch_size, train=train, seed=seed, rank=rank, world_size=world_size)
        self.dataset = _FileDataset(samples, transform)
        self.workers = int(workers)
        # the DataLoader draws its workers' base seed from this generator (from the global RNG without one)
        self._generator = torch.Generator()
        self._loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=_EpochSampler(self), num_workers=self.workers,
            persistent_workers=self.workers > 0, drop_last=False, generator=self._generator)

    def sample_seed_generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, self.epoch, self.rank, _STREAM_SAMPLE_SEEDS))
        return g

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._generator.manual_seed(derive_seed(self.seed, self.epoch, self.rank, _STREAM_WORKERS))
        for x, y in self._loader:
            yield x, y.to(torch.int64)
