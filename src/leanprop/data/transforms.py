"""ImageNet-style transforms on PIL images, written for this project (torchvision is not a dependency).

Random transforms take an explicit ``random.Random`` so a sample's augmentation depends only on the
seed the loader hands out for it, never on the global RNG or on which worker process runs it.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

from leanprop.data.augment import IMAGENET_MEAN, IMAGENET_STD

BILINEAR = Image.Resampling.BILINEAR


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: random.Random, attempts: int = 10) -> tuple[int, int, int, int]:
    """``(left, top, crop_width, crop_height)`` of a random crop covering a ``scale`` fraction of the area
    with aspect ratio (w/h) drawn log-uniformly from ``ratio``.

    Up to ``attempts`` draws are tried; if none fits inside the image, the largest centred crop whose
    aspect ratio is clamped into ``ratio`` is used (the same rule as torchvision's RandomResizedCrop).
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class RandomResizedCrop:
    """Crop a random region (see :func:`random_resized_crop_box`) and resize it to ``size x size``."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        left, top, w, h = random_resized_crop_box(img.width, img.height, self.scale, self.ratio, rng)
        return img.resize((self.size, self.size), BILINEAR, box=(left, top, left + w, top + h))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < self.p else img


class ResizeShorter:
    """Resize (bilinear) so the shorter side is ``size``, keeping the aspect ratio (longer side truncated)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> Image.Image:
        w, h = img.size
        if w <= h:
            new = (self.size, int(self.size * h / w))
        else:
            new = (int(self.size * w / h), self.size)
        return img if new == (w, h) else img.resize(new, BILINEAR)


class CenterCrop:
    """The central ``size x size`` window; images smaller than that are zero-padded around the centre."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> Image.Image:
        s = self.size
        w, h = img.size
        if w < s or h < s:
            canvas = Image.new(img.mode, (max(w, s), max(h, s)))
            canvas.paste(img, ((canvas.width - w) // 2, (canvas.height - h) // 2))
            img, (w, h) = canvas, canvas.size
        top = int(round((h - s) / 2.0))
        left = int(round((w - s) / 2.0))
        return img.crop((left, top, left + s, top + s))


class ToNormalizedTensor:
    """PIL image -> CHW float32 tensor ``(x / 255 - mean) / std``."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        a = np.asarray(img, dtype=np.uint8)
        if a.ndim == 2:
            a = a[:, :, None]
        x = torch.from_numpy(a.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
        return x.sub_(self.mean).div_(self.std)


class Compose:
    def __init__(self, steps: list):
        self.steps = list(steps)

    def __call__(self, img: Image.Image, rng: random.Random | None = None):
        for step in self.steps:
            img = step(img, rng)
        return img


def imagenet_train_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Compose:
    """RandomResizedCrop(image_size, scale 0.08-1, ratio 3/4-4/3) + horizontal flip + normalise."""
    return Compose([RandomResizedCrop(image_size), RandomHorizontalFlip(), ToNormalizedTensor(mean, std)])


def imagenet_eval_transform(image_size: int, resize_size: int, mean=IMAGENET_MEAN,
                            std=IMAGENET_STD) -> Compose:
    """Resize the shorter side to ``resize_size``, centre-crop ``image_size``, normalise."""
    return Compose([ResizeShorter(resize_size), CenterCrop(image_size), ToNormalizedTensor(mean, std)])
