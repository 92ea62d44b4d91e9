"""Execution modes (device, autocast dtype, ``torch.compile``, memory layout) and which ones a method honours.

A training run executes in one :class:`ExecutionMode`. Every method's controller declares what it cannot do
with ``unsupported_reason(mode) -> str | None`` (None: supported); :func:`check_mode` asks it, adds the refusals
that hold for every method (fp16 autocast needs a CUDA GPU and its GradScaler), and raises
:class:`leanprop.config.ConfigError` naming the mode, the reason and the way out, at configuration time, so a
mode a method cannot honour is never run silently wrong. The trainer calls it right after building the method.

:class:`CompileStats` counts what ``torch.compile`` did inside a block (graph breaks and their reasons, graphs
compiled, recompile-limit hits): the mode test matrix and ``leanprop bench modes`` report it. See
docs/benchmarks.md ("Execution modes") for the measured distances of every mode against eager fp32.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from leanprop.config import ConfigError

__all__ = ["AMP_DTYPES", "DEVICE_TYPES", "ExecutionMode", "CompileStats", "unsupported_reason", "check_mode"]

#: autocast settings of a mode (None: fp32, no autocast) and the dtype each one computes in
AMP_DTYPES: dict[str | None, torch.dtype | None] = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_TYPES = ("cpu", "cuda")


@dataclass(frozen=True)
class ExecutionMode:
    """How a training step executes: ``device`` type (``cpu`` | ``cuda``), ``amp`` (None = fp32, ``"bf16"``,
    ``"fp16"``: autocast; fp16 also scales the loss with a GradScaler), ``compile`` (the model runs under
    ``torch.compile``) and ``channels_last`` (NHWC model and inputs)."""

    device: str = "cpu"
    amp: str | None = None
    compile: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.device not in DEVICE_TYPES:
            raise ValueError(f"ExecutionMode.device must be a device type ({', '.join(DEVICE_TYPES)}), "
                             f"got {self.device!r}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"ExecutionMode.amp must be None, 'bf16' or 'fp16', got {self.amp!r}")

    @classmethod
    def of_run(cls, cfg: Any, device: torch.device | str) -> ExecutionMode:
        """The mode of a :class:`leanprop.config.RunConfig` on ``device`` (its ``train.amp``, ``train.compile``
        and ``train.channels_last``)."""
        dev = torch.device(device).type
        if dev not in DEVICE_TYPES:
            raise ConfigError(f"device {device!s}: leanprop trains on {' or '.join(DEVICE_TYPES)}")
        return cls(dev, cfg.train.amp, bool(cfg.train.compile), bool(cfg.train.channels_last))

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast compute dtype (None: fp32, no autocast)."""
        return AMP_DTYPES[self.amp]

    @property
    def name(self) -> str:
        """Short label, e.g. ``cpu-fp32``, ``cpu-bf16-compile``, ``cuda-fp16-nhwc``."""
        return "-".join([self.device, self.amp or "fp32", *(["compile"] if self.compile else []),
                         *(["nhwc"] if self.channels_last else [])])

    def describe(self) -> str:
        """Readable form, e.g. ``cuda, bf16 autocast, torch.compile, channels-last``."""
        return ", ".join([self.device, f"{self.amp} autocast" if self.amp else "fp32",
                          *(["torch.compile"] if self.compile else []), *(["channels-last"] if self.channels_last
                                                                          else [])])

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of this mode (none for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.dtype)

    @classmethod
    def parse(cls, name: str) -> ExecutionMode:
        """The inverse of :attr:`name`: ``cpu-bf16-compile`` -> ``ExecutionMode("cpu", "bf16", compile=True)``;
        the dtype may be left out (``cuda-compile``: fp32)."""
        parts = [p for p in str(name).strip().lower().split("-") if p]
        if not parts or parts[0] not in DEVICE_TYPES:
            raise ValueError(f"unknown execution mode {name!r}: use DEVICE[-DTYPE][-compile][-nhwc] with DEVICE "
                             f"{' or '.join(DEVICE_TYPES)} and DTYPE fp32, bf16 or fp16, e.g. cpu-bf16-compile")
        amp, flags = None, set()
        for p in parts[1:]:
            if p in ("fp32", "bf16", "fp16"):
                amp = None if p == "fp32" else p
            elif p in ("compile", "nhwc"):
                flags.add(p)
            else:
                raise ValueError(f"unknown execution mode {name!r}: {p!r} is not fp32, bf16, fp16, compile or nhwc "
                                 "(e.g. cpu-bf16-compile, cuda-fp16, cpu-fp32-nhwc)")
        return cls(parts[0], amp, "compile" in flags, "nhwc" in flags)


def _generic_reason(mode: ExecutionMode) -> tuple[str, str] | None:
    """(reason, fix) for a mode no method can run, or None."""
    if mode.amp == "fp16" and mode.device != "cuda":
        return "fp16 autocast needs a CUDA GPU (its GradScaler)", "on CPU use train.amp=bf16"
    if mode.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is available", "use device=cpu (or auto)"
    return None


def unsupported_reason(controller: Any, mode: ExecutionMode) -> str | None:
    """Why ``mode`` cannot run with this method (``controller``: the :class:`leanprop.methods.Controller` that
    ``leanprop.convert_`` returned), or None when it can: the refusals every method shares, then the
    controller's own ``unsupported_reason``."""
    generic = _generic_reason(mode)
    if generic is not None:
        return f"{generic[0]}; {generic[1]}"
    return controller.unsupported_reason(mode)


def check_mode(controller: Any, mode: ExecutionMode, *, method: str | None = None) -> None:
    """Raise :class:`leanprop.config.ConfigError` when ``mode`` cannot run with the method of ``controller``.
    ``method`` names it in the message (default: the controller's name)."""
    reason = unsupported_reason(controller, mode)
    if reason is not None:
        who = method or controller.name
        raise ConfigError(f"method {who} cannot train in mode {mode.name} ({mode.describe()}): {reason}")


# --------------------------------------------------------------------------------------------------------
# what torch.compile did


class _WarningCatcher(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class CompileStats:
    """Counts, over a ``with`` block, what ``torch.compile`` (Dynamo) did: ``graph_breaks`` (and
    ``break_reasons``: reason -> count), ``graphs`` (graphs compiled) and ``recompile_limit_hits`` (Dynamo's
    "hit config.recompile_limit" warnings: a frame it gave up compiling and runs eagerly from then on).

    Differences of Dynamo's global counters before and after the block, so earlier compilations elsewhere do not
    count; entering the same object again adds to its counts (one object per model of interleaved steps)."""

    graph_breaks: int = 0
    graphs: int = 0
    recompile_limit_hits: int = 0
    break_reasons: dict[str, int] | None = None

    def __enter__(self) -> CompileStats:
        from torch._dynamo.utils import counters

        self._breaks0 = Counter(counters["graph_break"])
        self._graphs0 = counters["stats"]["unique_graphs"]
        self._catcher = _WarningCatcher()
        self._logger = logging.getLogger("torch._dynamo")
        self._logger.addHandler(self._catcher)
        return self

    def __exit__(self, *exc: object) -> None:
        from torch._dynamo.utils import counters

        self._logger.removeHandler(self._catcher)
        diff = Counter(counters["graph_break"])
        diff.subtract(self._breaks0)
        reasons = Counter(self.break_reasons or {})
        reasons.update({k: v for k, v in diff.items() if v > 0})
        self.break_reasons = dict(reasons)
        self.graph_breaks = sum(reasons.values())
        self.graphs += counters["stats"]["unique_graphs"] - self._graphs0
        self.recompile_limit_hits += sum("recompile_limit" in m or "cache_size_limit" in m
                                         for m in self._catcher.messages)

    def as_dict(self, max_reasons: int = 5) -> dict[str, Any]:
        """JSON-friendly: the counts and the most frequent break reasons (first line of each, shortened)."""
        top = sorted((self.break_reasons or {}).items(), key=lambda kv: -kv[1])[:max_reasons]
        return {"graph_breaks": self.graph_breaks, "graphs": self.graphs,
                "recompile_limit_hits": self.recompile_limit_hits,
                "break_reasons": {k.splitlines()[0][:160]: v for k, v in top}}
