"""Learning-rate schedules as pure functions of the global iteration (so resuming needs only the step).

- ``multistep``: ``lr·γ^#{m ≤ epoch}`` with epoch milestones (CIFAR recipes: ×0.1 at 50 and 100).
- ``piecewise``: constant between iteration ``boundaries`` (Chakrabarti & Moseley 2019: 0.01 for 400 it, 0.1, ÷10 at
  32k, 48k).
- ``cosine``: half-cosine from ``lr`` to ``min_lr`` over the run (after any warm-up).
- ``constant``.
Linear warm-up (the ImageNet recipe of Raihan & Aamodt 2020) multiplies any of them by ``(it+1)/(T+1)`` for ``it < T``,
``T = warmup_epochs·steps_per_epoch`` (their official ImageNet code; docs/configuration.md, ``schedule``).
"""

from __future__ import annotations

import bisect
import math

from leanprop.config import ScheduleConfig


class LRSchedule:
    def __init__(self, cfg: ScheduleConfig, base_lr: float, steps_per_epoch: int, epochs: int):
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1 (is the training set empty?)")
        self.cfg = cfg
        self.base_lr = base_lr
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * epochs
        self.warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))

    def _main(self, step: int) -> float:
        c = self.cfg
        if c.name == "constant":
            return self.base_lr
        if c.name == "multistep":
            epoch = step // self.steps_per_epoch
            return self.base_lr * c.gamma ** sum(1 for m in c.milestones if epoch >= m)
        if c.name == "piecewise":
            return float(c.values[bisect.bisect_right(c.boundaries, step)])
        if c.name == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            t = min(1.0, max(0, step - self.warmup_steps) / span)
            return c.min_lr + (self.base_lr - c.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
        raise ValueError(f"unknown schedule '{c.name}'")

    def lr_at(self, step: int) -> float:
        lr = self._main(step)
        if step < self.warmup_steps:
            lr *= (step + 1) / (self.warmup_steps + 1)
        return lr
