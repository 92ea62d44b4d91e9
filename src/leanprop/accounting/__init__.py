"""Instruments that measure a training step: counted FLOPs, bytes kept for backward, peak memory, max batch.

    from leanprop.accounting import count_flops, saved_bytes
    count_flops(model, (1, 3, 32, 32)).training_reduction     # conv/linear MACs against dense
    saved_bytes(model, torch.randn(8, 3, 32, 32)).total_bytes  # what one forward keeps for backward
"""

from leanprop.accounting.flops import FlopReport, count_flops
from leanprop.accounting.memory import max_batch, peak_memory, saved_bytes

__all__ = ["FlopReport", "count_flops", "saved_bytes", "peak_memory", "max_batch"]
