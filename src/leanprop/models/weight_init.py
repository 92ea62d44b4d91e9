"""Weight initialisation shared by the zoo (the scheme torchvision uses for its CNNs)."""

from __future__ import annotations

from torch import nn

__all__ = ["init_weights_"]


def init_weights_(model: nn.Module, *, linear_std: float | None = None) -> None:
    """Initialise ``model`` in place.

    * ``nn.Conv2d``: Kaiming-normal weights (``mode="fan_out"``, ReLU gain), zero bias.
    * ``nn.BatchNorm2d``: weight 1, bias 0.
    * ``nn.Linear``: PyTorch's default init when ``linear_std`` is None, otherwise
      ``normal(0, linear_std)`` weights and zero bias (VGG uses ``linear_std=0.01``).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
