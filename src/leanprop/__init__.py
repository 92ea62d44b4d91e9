"""leanprop: memory- and compute-efficient back-propagation for PyTorch, with measured savings.

    controller = leanprop.convert_(model, leanprop.SWATConfig(sparsity=0.9))   # in place, same Parameters
    ... forward, backward, optimizer.step(), controller.step() ...
    leanprop.hard_prune_(model); leanprop.revert_(model)                        # a plain sparse model
    controller = leanprop.convert_(model, leanprop.BLPAConfig(bits=4))          # 4-bit activations for backward
    controller = leanprop.convert_(model, leanprop.parse_method("swat-u90+blpa4"))  # both, from a spec
"""

__version__ = "0.1.0"

from leanprop.blpa.config import BLPAConfig  # noqa: E402
from leanprop.checkpointing.config import CheckpointConfig  # noqa: E402
from leanprop.methods import Controller, parse_method  # noqa: E402
from leanprop.nn.convert import convert_, revert_  # noqa: E402
from leanprop.profile import profile  # noqa: E402
from leanprop.swat.config import SWATConfig  # noqa: E402
from leanprop.swat.prune import hard_prune_  # noqa: E402

__all__ = ["SWATConfig", "BLPAConfig", "CheckpointConfig", "Controller", "parse_method", "convert_", "revert_",
           "hard_prune_", "profile", "__version__"]
