"""Optimizers with optional weight-decay exclusion of BatchNorm parameters and biases."""

from __future__ import annotations

import torch
from torch import nn

from leanprop.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, exclude_bn_bias: bool) -> list[dict]:
    """Split parameters into decayed and non-decayed groups.

    With ``exclude_bn_bias`` every 1-D parameter (BatchNorm/LayerNorm scale and shift, biases) gets no
    weight decay, the ImageNet recipe of Raihan & Aamodt (2020) done right: by shape, not by module name
    (docs/configuration.md, ``optim``).
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if exclude_bn_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.wd_exclude_bn_bias)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    raise ValueError(f"optim.name={cfg.name!r}: use sgd or adamw")
