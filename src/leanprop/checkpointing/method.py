"""Per-block checkpointing plugged in as a method (:mod:`leanprop.methods`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from leanprop.checkpointing.blocks import (
    checkpoint_blocks_,
    checkpointed_blocks,
    default_blocks,
    uncheckpoint_blocks_,
)
from leanprop.checkpointing.config import CheckpointConfig
from leanprop.methods import Controller, FilterFn, Method


class CheckpointController(Controller):
    """Checkpointing keeps no state; it reports which blocks run twice."""

    name = "checkpoint"
    flops_basis = "dense + one more forward of each block"

    def __init__(self, model: nn.Module, blocks: list[str]):
        self.model = model
        self.blocks = blocks

    def training_flops(self, model: nn.Module, input_shape: tuple[int, ...]) -> tuple[float, str]:
        """Dense training MACs plus one more forward of every checkpointed block's conv/linear layers."""
        from leanprop.ops.flops import count_flops

        rep = count_flops(model, input_shape)
        prefixes = [name + "." for name in self.blocks]
        extra = sum(layer.macs for layer in rep.layers if any(layer.name.startswith(p) for p in prefixes))
        return (rep.train_dense_macs + extra) / rep.train_dense_macs, self.flops_basis

    def notes(self) -> dict[str, Any]:
        return {"checkpointed_blocks": len(self.blocks)}

    def summary(self) -> str:
        return f"checkpointed blocks ({len(self.blocks)}): " + ", ".join(self.blocks)

    def summary_lines(self, model: nn.Module, input_shape: tuple[int, ...], out_dir: Any = None) -> list[str]:
        return [f"  checkpointing  {len(self.blocks)} blocks keep only their input and run their forward again "
                "in backward"]


def _convert(model: nn.Module, cfg: CheckpointConfig, filter_fn: FilterFn | None,
             others: Sequence[Any]) -> CheckpointController:
    names = {id(m): n for n, m in model.named_modules()}
    blocks = [b for b in default_blocks(model) if filter_fn is None or filter_fn(names[id(b)], b)]
    n = checkpoint_blocks_(model, blocks=blocks)
    if n == 0:
        raise ValueError(f"method 'checkpoint': {type(model).__name__} has no residual block to checkpoint "
                         "(no composite child of an nn.Sequential)")
    return CheckpointController(model, checkpointed_blocks(model))


def _parse(word: str) -> CheckpointConfig | None:
    return CheckpointConfig() if word == "checkpoint" else None


METHOD = Method(
    name="checkpoint", config_type=CheckpointConfig, order=30, convert=_convert,
    revert=lambda model: uncheckpoint_blocks_(model), is_converted=lambda model: bool(checkpointed_blocks(model)),
    parse=_parse, spec_of=lambda cfg: "checkpoint", grammar="checkpoint",
)
