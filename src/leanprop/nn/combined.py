"""SWAT + BLPA on one model (docs/methods/swat_blpa.md): one controller over both methods' controllers.

``convert_(model, [SWATConfig(...), BLPAConfig(bits=4)])`` gives every conv/linear layer SWAT's policy (sparse
weights forward and backward, Top-K activations for the weight gradient) and BLPA's storage policy to what they
keep for backward:

* a BN->ReLU->conv unit whose conv is a SWAT layer becomes a BLPA *half* unit (BN->ReLU keeps K-bit codes of its
  BN output and the exact ReLU mask); the SWAT conv after it keeps its ``X_s`` packed (values + 1-bit mask) and
  the generic codec stores those kept values as ``codec_bits``-bit codes;
* every other saved float tensor (BN inputs of post-activation blocks, pooling inputs, SWAT's kept values) goes
  through BLPA's saved-tensor codec; plain ReLUs keep 1-bit masks; ``W_s`` is never copied.

Each layer is swapped once (SWAT layers stay SWAT layers, BN heads become BLPA heads): no double wrapping, and the
Parameters and ``state_dict`` keys are the plain model's.
"""

from __future__ import annotations

from typing import Any

from leanprop.blpa.controller import BLPAController
from leanprop.swat.controller import SWATController

__all__ = ["CombinedController"]


class CombinedController:
    """SWAT's controller (budgets, thresholds, sparsity reports) and BLPA's (units, codec) behind one API."""

    def __init__(self, swat: SWATController, blpa: BLPAController):
        self.swat = swat
        self.blpa = blpa

    def unsupported_reason(self, mode: Any) -> str | None:
        """A mode either method cannot honour (:func:`leanprop.modes.check_mode`): SWAT's reason, else BLPA's."""
        return self.swat.unsupported_reason(mode) or self.blpa.unsupported_reason(mode)

    def attach_optimizer(self, optimizer) -> None:
        self.swat.attach_optimizer(optimizer)

    def on_epoch_start(self, epoch: int) -> None:
        self.swat.on_epoch_start(epoch)
        self.blpa.on_epoch_start(epoch)

    def step(self) -> None:
        self.swat.step()
        self.blpa.step()

    @property
    def needs_kernel_calibration(self) -> bool:
        return self.swat.needs_kernel_calibration

    def calibrate_kernels(self, example_input, **kw):
        return self.swat.calibrate_kernels(example_input, **kw)

    @property
    def kernel_timings(self):
        return self.swat.kernel_timings

    def kernel_summary(self) -> str:
        return self.swat.kernel_summary()

    def state_dict(self) -> dict[str, Any]:
        return {"swat": self.swat.state_dict(), "blpa": self.blpa.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"swat", "blpa"}:
            raise ValueError("checkpoint method state is not a SWAT+BLPA state (keys 'swat' and 'blpa'); it was "
                             "trained with another method")
        self.swat.load_state_dict(state["swat"])
        self.blpa.load_state_dict(state["blpa"])

    def layer_stats(self) -> list[dict[str, Any]]:
        return self.swat.layer_stats()

    def measured_sparsity(self) -> dict[str, float | None]:
        return self.swat.measured_sparsity()

    def summary(self) -> str:
        return self.swat.summary() + "\n\n" + self.blpa.summary()
