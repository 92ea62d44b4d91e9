"""Batched augmentation and normalisation for small in-memory images (CIFAR-sized).

Images stay NHWC ``uint8`` in memory. For pad-``p`` random crops with horizontal flips, the zero-padded
dataset is built once; a batch is then cut out with ONE gather: every output pixel reads
``padded[index, dy + row, dx + col]`` where ``(dy, dx)`` is the sample's crop offset and the column order
is reversed for flipped samples. To make that gather cheap, a pixel's channels are stored in one machine
word (3 channels padded to 4 bytes and viewed as ``int32``), so the gather moves one element per pixel.
The result is converted to float, scaled and normalised into a contiguous NCHW ``float32`` tensor.
"""

from __future__ import annotations

import numpy as np
import torch

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# channels padded up to a word size the gather can move as one element
_WORD_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (of pixel values scaled to [0, 1]) of NHWC uint8 images, chunked."""
    c = images.shape[-1]
    total = np.zeros(c, np.float64)
    total_sq = np.zeros(c, np.float64)
    for s in range(0, len(images), chunk):
        block = images[s:s + chunk].reshape(-1, c).astype(np.float64)
        total += block.sum(0)
        total_sq += np.square(block).sum(0)
    count = max(1, images.size // c)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.where(std > 0, std, 255.0)  # constant channel: leave it unscaled rather than divide by 0
    return tuple(float(m) for m in mean / 255.0), tuple(float(s) for s in std / 255.0)


class Normalize:
    """uint8 images (NHWC, any strides) -> contiguous NCHW float32 ``(x / 255 - mean) / std``."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        if len(mean) != len(std):
            raise ValueError(f"mean {mean} and std {std} have different lengths")
        m = torch.tensor(mean, dtype=torch.float32)
        s = torch.tensor(std, dtype=torch.float32)
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale = (1.0 / (255.0 * s)).view(1, -1, 1, 1)
        self.shift = (-m / s).view(1, -1, 1, 1)

    def __call__(self, batch_nhwc: torch.Tensor) -> torch.Tensor:
        if batch_nhwc.shape[-1] != self.scale.shape[1]:
            raise ValueError(f"images have {batch_nhwc.shape[-1]} channels but the normalisation has "
                             f"{self.scale.shape[1]}")
        x = batch_nhwc.permute(0, 3, 1, 2).contiguous().to(torch.float32)
        return x.mul_(self.scale).add_(self.shift)


def crop_flip_params(n: int, pad: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Per-sample crop offsets ``dy, dx`` in ``[0, 2*pad]`` and flip flags, drawn from ``generator``."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    return dy, dx, flip


class PadCropFlip:
    """Random pad-``pad`` crops (zero padding) and horizontal flips of a whole batch with a single gather.

    ``images`` is the NHWC uint8 dataset; the padded copy is made once here. Call with dataset indices,
    offsets and flip flags (see :func:`crop_flip_params`); returns an NHWC uint8 batch (a strided view).
    """

    def __init__(self, images: torch.Tensor, pad: int = 4):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected NHWC uint8 images, got {images.dtype} {tuple(images.shape)}")
        n, h, w, c = images.shape
        self.pad, self.h, self.w, self.c = pad, h, w, c
        self.hp, self.wp = h + 2 * pad, w + 2 * pad
        word = next((k for k in _WORD_DTYPES if k >= c), None)
        self.word = word
        padded = torch.zeros((n, self.hp, self.wp, word or c), dtype=torch.uint8)
        padded[:, pad:pad + h, pad:pad + w, :c] = images
        if word is None:  # many channels: gather whole channel vectors instead of words
            self.padded = padded
        else:
            self.padded = padded.view(_WORD_DTYPES[word]).view(n, self.hp, self.wp)
        self._rows = torch.arange(h)
        self._cols = torch.arange(w)
        self._cols_rev = self._cols.flip(0)

    def __call__(self, idx: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                 flip: torch.Tensor) -> torch.Tensor:
        b = idx.numel()
        rows = dy.view(b, 1) + self._rows.view(1, -1)  # (B, H)
        cols = dx.view(b, 1) + torch.where(flip.view(b, 1), self._cols_rev, self._cols)  # (B, W)
        if self.word is None:
            return self.padded[idx.view(b, 1, 1), rows.view(b, self.h, 1), cols.view(b, 1, self.w)]
        flat = (idx.view(b, 1, 1) * (self.hp * self.wp) + rows.view(b, self.h, 1) * self.wp
                + cols.view(b, 1, self.w))
        out = torch.take(self.padded, flat)  # (B, H, W) words
        return out.view(torch.uint8).view(b, self.h, self.w, self.word)[..., : self.c]
