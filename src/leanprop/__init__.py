"""leanprop: memory- and compute-efficient back-propagation for PyTorch, with measured savings.

    controller = leanprop.convert_(model, leanprop.SWATConfig(sparsity=0.9))   # in place, same Parameters
    ... forward, backward, optimizer.step(), controller.step() ...
    leanprop.hard_prune_(model); leanprop.revert_(model)                        # a plain sparse model
"""

__version__ = "0.1.0"

from leanprop.nn.convert import convert_, hard_prune_, revert_  # noqa: E402
from leanprop.swat.config import SWATConfig  # noqa: E402

__all__ = ["SWATConfig", "convert_", "revert_", "hard_prune_", "__version__"]
