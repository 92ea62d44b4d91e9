"""Activation checkpointing per residual block: the ``checkpoint`` baseline of the memory benchmarks.

``checkpoint_blocks_(model)`` makes each block keep only its input for backward and recompute its inside
during backward (``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``; Chen et al. 2016).
Gradients are exact.  The wrapping is an instance-level ``forward`` attribute, so module names, ``state_dict``
keys and Parameters do not change, and ``uncheckpoint_blocks_`` restores the original behaviour.

Batch-norm running statistics are updated once per step as without checkpointing: the recomputation runs
under a context that restores the block's BN buffers afterwards.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_blocks_", "uncheckpoint_blocks_", "checkpointed_blocks", "default_blocks"]


@contextlib.contextmanager
def _keep_bn_stats(module: nn.Module) -> Iterator[None]:
    """Restore the running statistics of every batch-norm layer in ``module`` on exit (for recomputation)."""
    saved = [(b, b.detach().clone()) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


class _CheckpointedForward:
    """Instance-level ``forward`` of a checkpointed block (an object, not a closure, so that
    ``copy.deepcopy`` and pickling of the model keep working)."""

    def __init__(self, module: nn.Module, previous: object | None):
        self.module = module
        self.previous = previous  # an instance-level forward that was there before, if any

    def _inner(self):
        if self.previous is not None:
            return self.previous
        return types.MethodType(type(self.module).forward, self.module)

    def __call__(self, *args, **kwargs):
        fn = self._inner()
        if self.module.training and torch.is_grad_enabled():
            return self._checkpointed(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    @torch.compiler.disable
    def _checkpointed(self, fn, *args, **kwargs):
        """The checkpointed call; eager inside a compiled model (one graph break per block), since Dynamo cannot
        trace ``checkpoint``'s ``context_fn``."""
        def contexts():
            return contextlib.nullcontext(), _keep_bn_stats(self.module)

        return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts, **kwargs)


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of the ``leanprop.models`` architectures: every child of an ``nn.Sequential`` that is
    itself a composite module (has submodules) and not an ``nn.Sequential``; nested Sequentials are searched,
    blocks are not (so a block's ``downsample`` Sequential is never wrapped on its own).  Stages of plain layers
    (VGG ``features``) yield nothing."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(module, nn.Sequential) and not isinstance(child, nn.Sequential) and any(child.children()):
                found.append(child)
            else:
                visit(child)

    visit(model)
    return found


def checkpoint_blocks_(model: nn.Module, block_types: type | tuple[type, ...] | None = None,
                       blocks: list[nn.Module] | None = None) -> int:
    """Checkpoint each residual block of ``model`` in place; returns how many blocks were wrapped.

    ``block_types``: wrap every module of these classes instead (outermost only: a match inside an already
    wrapped module is left alone); ``blocks``: wrap exactly these modules.
    Default: :func:`default_blocks`.  Blocks already wrapped are skipped and
    not counted.  The checkpoint only acts while the block is training and grad is enabled.
    """
    if blocks is not None:
        blocks = list(blocks)
    elif block_types is None:
        blocks = default_blocks(model)
    else:
        blocks = []

        def visit(module: nn.Module) -> None:
            for child in module.children():
                if isinstance(child, block_types):
                    blocks.append(child)
                else:
                    visit(child)

        visit(model)
    n = 0
    for block in blocks:
        current = block.__dict__.get("forward")
        if isinstance(current, _CheckpointedForward):
            continue
        block.forward = _CheckpointedForward(block, current)
        n += 1
    return n


def checkpointed_blocks(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` whose forward is checkpointed."""
    return [name for name, m in model.named_modules() if isinstance(m.__dict__.get("forward"), _CheckpointedForward)]


def uncheckpoint_blocks_(model: nn.Module) -> int:
    """Undo :func:`checkpoint_blocks_` in place; returns how many blocks were unwrapped."""
    n = 0
    for m in model.modules():
        wrapper = m.__dict__.get("forward")
        if isinstance(wrapper, _CheckpointedForward):
            if wrapper.previous is None:
                del m.forward
            else:
                m.forward = wrapper.previous
            n += 1
    return n
