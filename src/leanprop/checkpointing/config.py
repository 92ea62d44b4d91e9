"""Configuration of per-block checkpointing (docs/benchmarks.md, 'checkpoint')."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    """Checkpoint every residual block: each keeps only its input for backward and runs its forward again there.

    The blocks are the composite children of the model's ``nn.Sequential`` containers (the residual blocks of
    the usual ResNet-style models; :func:`leanprop.checkpointing.blocks.default_blocks`). Gradients are exact;
    training costs one more forward of every block.
    """

    @classmethod
    def preset(cls, name: str = "") -> CheckpointConfig:
        """The spec word ``checkpoint`` (no variants)."""
        if name:
            raise ValueError(f"checkpoint has no preset {name!r}; use plain 'checkpoint'")
        return cls()
