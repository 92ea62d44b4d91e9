"""In-place model conversion through the method registry: ``convert_`` / ``revert_``."""

from leanprop.nn.convert import convert_, revert_

__all__ = ["convert_", "revert_"]
