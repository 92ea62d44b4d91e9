"""The in-memory form every small-image dataset is brought into before batching."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ArraySplits:
    """Train and test images as NHWC uint8 arrays with int64 labels, plus how to normalise them."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # human-readable origin, e.g. "CIFAR-10 from python pickles in data/cifar-10-batches-py"

    @property
    def num_classes(self) -> int:
        return len(self.classes)
