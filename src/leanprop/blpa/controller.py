"""BLPA's controller: finds BN->ReLU->Conv units, swaps them (``convert_``), attaches the codec, reports."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from leanprop.blpa.config import BLPAConfig
from leanprop.blpa.layers import unit_padding
from leanprop.methods import Controller
from leanprop.ops.codec import SavedTensorCodec
from leanprop.ops.fusion import FusableConv
from leanprop.ops.saving_layers import EagerReLU, MaskReLU
from leanprop.utils import atomic_write_text

__all__ = ["Unit", "find_units", "BLPAController"]


@dataclass(frozen=True)
class Unit:
    """One BN->ReLU(->Conv) run: full module names of its parts (conv None: a half unit)."""

    bn: str
    relu: str
    conv: str | None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_relu(m: nn.Module | None) -> bool:
    return type(m) in (nn.ReLU, MaskReLU, EagerReLU)  # another method's ReLU swap (e.g. SWAT's) is still a ReLU


def _is_conv(m: nn.Module | None) -> bool:
    """A conv a fused unit can run: a plain (or another method's fusable) ``nn.Conv2d`` with zero padding."""
    return (type(m) is nn.Conv2d or (isinstance(m, nn.Conv2d) and isinstance(m, FusableConv))) \
        and unit_padding(m) is not None


def find_units(model: nn.Module) -> list[Unit]:
    """Every BN->ReLU->Conv (or BN->ReLU) run provable from the module structure.

    A module may declare its runs with a ``blpa_units()`` method returning ``(bn, relu, conv_or_None)`` child
    names, where the ReLU's output feeds only that conv (the project's pre-activation blocks do); in an
    ``nn.Sequential`` consecutive ``BatchNorm2d, ReLU, Conv2d`` children form a unit and ``BatchNorm2d, ReLU``
    followed by anything else a half unit.
    """
    units: list[Unit] = []
    claimed: set[str] = set()
    for prefix, module in model.named_modules():
        runs: list[tuple[str, str, str | None]] = []
        declared = getattr(module, "blpa_units", None)
        if callable(declared):
            runs = list(declared())
        elif isinstance(module, nn.Sequential):
            names = list(module._modules)
            for i in range(len(names) - 1):
                a, b = module._modules[names[i]], module._modules[names[i + 1]]
                if type(a) is nn.BatchNorm2d and _is_relu(b):
                    c = module._modules[names[i + 2]] if i + 2 < len(names) else None
                    runs.append((names[i], names[i + 1], names[i + 2] if _is_conv(c) else None))
        for bn, relu, conv in runs:
            full = Unit(_join(prefix, bn), _join(prefix, relu), _join(prefix, conv) if conv else None)
            parts = {full.bn, full.relu} | ({full.conv} if full.conv else set())
            if parts & claimed:
                continue
            mods = dict(module.named_children())
            if type(mods.get(bn)) is not nn.BatchNorm2d or not _is_relu(mods.get(relu)):
                continue
            if conv is not None and not _is_conv(mods.get(conv)):
                continue
            claimed |= parts
            units.append(full)
    return units


class BLPAController(Controller):
    """State and reporting of a BLPA-converted model (BLPA keeps no per-step state of its own)."""

    name = "blpa"
    flops_basis = "as dense (BLPA changes storage only)"

    def __init__(self, model: nn.Module, units: list[Unit], cfg: BLPAConfig, codec: SavedTensorCodec | None,
                 kernels_path: str | None):
        self.model = model
        self.units = units
        self.cfg = cfg
        self.codec = codec
        self.kernels_path = kernels_path
        has_norm = any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) for m in model.modules())
        if not units and (codec is None or not has_norm):
            what = ("its storage policy still keeps masks and codes of what autograd saves" if codec is not None
                    else "nothing changed (codec=false)")
            warnings.warn(f"BLPA: the model has no BatchNorm2d->ReLU(->Conv2d) run and no normalisation layer to "
                          f"build units on; {what}", RuntimeWarning, stacklevel=3)

    def unsupported_reason(self, mode: Any) -> str | None:
        """Why BLPA cannot train in ``mode`` (a :class:`leanprop.modes.ExecutionMode`), or None when it can
        (:func:`leanprop.modes.check_mode` refuses the mode at configuration time). BLPA declares no refusal:
        the compiled C kernels serve CPU tensors only and CUDA tensors take the torch-op path."""
        return None

    def step(self) -> None:
        """After ``optimizer.step()``: the codec's stochastic rounding moves on to the next step's draws."""
        if self.codec is not None:
            self.codec.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.cfg), "units": len(self.units),
                "rng": self.codec.rng_state() if self.codec is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("config", {}).get("bits", self.cfg.bits) != self.cfg.bits:
            raise ValueError(f"checkpoint was trained with BLPA bits={state['config']['bits']}, "
                             f"this run uses bits={self.cfg.bits}")
        if self.codec is not None and state.get("rng"):
            self.codec.set_rng_state(state["rng"])

    def summary(self) -> str:
        modules = dict(self.model.named_modules())
        bits = "fp32 xhat + 1-bit mask" if self.cfg.bits == 32 else f"{self.cfg.bits}-bit codes"
        lines = [f"BLPA {self.cfg.mode}, {bits}, window ±{self.cfg.window}σ, "
                 f"kernels: {'compiled C' if self.kernels_path else 'torch ops'}, "
                 f"outside units: {self._outside()}"
                 + (" (simulate: fake-quant, no memory saved)" if self.cfg.simulate else ""),
                 f"{'unit (BN)':<32} {'kind':<6} {'channels':>8}  conv"]
        for u in self.units:
            c = modules[u.bn].num_features
            lines.append(f"{u.bn:<32} {'fused' if u.conv else 'half':<6} {c:>8}  {u.conv or '-'}")
        lines.append(f"{len(self.units)} units ({sum(u.conv is not None for u in self.units)} fused with a conv)")
        return "\n".join(lines)

    def _outside(self) -> str:
        """How what lies outside the units is kept, in words."""
        bits = self.cfg.outside_bits
        if bits is None or (bits >= 32 and not self.cfg.policy):
            return "kept as they are" + (" (1-bit ReLU masks)" if bits is not None else "")
        rounding = "stochastic" if self.cfg.stochastic_rounding else "nearest"
        extra = "".join(f", {k} {v}" for k, v in sorted(self.cfg.policy.items()))
        return f"storage policy: {bits}-bit codes ({rounding} rounding{extra}), 1-bit ReLU/dropout masks"

    def summary_lines(self, model: nn.Module, input_shape: tuple[int, ...], out_dir: Any = None) -> list[str]:
        """The stored precision in one line; the per-unit table goes to ``out_dir/blpa_units.txt``."""
        b = self.cfg
        where = ""
        if out_dir is not None:
            table = Path(out_dir) / "blpa_units.txt"
            atomic_write_text(table, self.summary() + "\n")
            where = f"  (per unit: {table})"
        stored = "fp32 (lossless check mode)" if b.bits == 32 else f"{b.bits}-bit codes"
        window = "" if b.bits == 32 else f", window +-{b.window:g} std"
        codec = self._outside()
        sim = "; simulate=true: fake-quant, no memory saved" if b.simulate else ""
        return [f"  BLPA activations  BN outputs stored as {stored} (mode {b.mode}{window}); other saved tensors "
                f"{codec}{sim}{where}"]
