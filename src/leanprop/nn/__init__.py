"""Swapped layers and in-place model conversion."""

from leanprop.nn.convert import convert_, hard_prune_, revert_
from leanprop.nn.swat_layers import SWATConv2d, SWATLinear

__all__ = ["convert_", "revert_", "hard_prune_", "SWATConv2d", "SWATLinear"]
