"""Hard pruning at the end of SWAT training: the sparse model (docs/methods/swat.md, 'How to use')."""

from __future__ import annotations

import torch
from torch import nn

from leanprop.swat.layers import SWAT_LAYERS

__all__ = ["hard_prune_"]


@torch.no_grad()
def hard_prune_(model: nn.Module) -> dict[str, float]:
    """Zero the pruned weights of every SWAT layer for good (exact Top-K at its final budget;
    docs/methods/swat.md, 'How to use').

    Returns the weight sparsity each layer ends with. Use it at the end of training to obtain the sparse
    model; ``revert_`` afterwards gives a plain model whose zeros are the SWAT topology.
    """
    result = {}
    for name, module in model.named_modules():
        if isinstance(module, SWAT_LAYERS):
            module.refresh_weight_threshold()
            mask = module.weight_mask()
            if mask is not None:
                module.weight.mul_(mask)
            result[name] = 1.0 - float(torch.count_nonzero(module.weight)) / module.weight.numel()
    return result
