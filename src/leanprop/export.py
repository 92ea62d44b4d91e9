"""What a converted model computes at evaluation time, as a plain PyTorch ``state_dict`` (``leanprop export``).

A method layer that evaluates with other weights than its Parameters (SWAT: ``TopK(W)`` under the cached threshold
or structured mask, ``sparse_eval``; docs/methods/swat.md) says so through one hook, ``inference_weights()`` ->
``{parameter name: tensor}``. :func:`inference_state_dict` asks every module for it and puts the answers in place of
those Parameters in the model's ``state_dict``; modules without the hook (BLPA's units, plain layers) evaluate with
their own Parameters and need nothing. The result loads into the unconverted model (the keys never change, see
:mod:`leanprop.nn.convert`), which then gives the converted model's evaluation outputs.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["inference_state_dict"]


@torch.no_grad()
def inference_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of ``model`` (converted or not) with each parameter replaced by the tensor its
    evaluation forward uses; detached CPU copies, loadable into the plain architecture with ``load_state_dict``."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keys: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        keys.setdefault(id(p), []).append(name)
    was_training = model.training
    model.eval()
    try:
        for mod_name, module in model.named_modules():
            hook = getattr(module, "inference_weights", None)
            if not callable(hook):
                continue
            for pname, value in hook().items():
                names = keys.get(id(getattr(module, pname)), [])
                if not names:
                    raise ValueError(f"{mod_name or type(module).__name__}.inference_weights() returned {pname!r}, "
                                     "which is not one of the model's parameters")
                for key in names:
                    if key in state:
                        state[key] = value.detach().clone().to(state[key].dtype)
    finally:
        model.train(was_training)
    return {k: v.cpu() for k, v in state.items()}
