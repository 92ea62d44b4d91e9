"""Per-block activation checkpointing as a method (``checkpoint``): the baseline the memory benchmarks compare
BLPA and SWAT with (Chen et al. 2016, "Training deep nets with sublinear memory cost"; ``torch.utils.checkpoint``)."""

from leanprop.checkpointing.config import CheckpointConfig

__all__ = ["CheckpointConfig"]
