"""The method plug-in boundary: the :class:`Controller` protocol, the registry keyed by config type, and the
one method-spec grammar (docs/methods/README.md).

A method is a config dataclass plus a :class:`Method` entry: how a spec word names it (``swat-u90``,
``blpa4``, ``checkpoint``), how ``convert_`` applies it and how ``revert_`` undoes it. ``convert_`` returns the
method's controller; the trainer, the CLI and the benchmarks talk to controllers only through
:class:`Controller`, never by method name. Several configs compose (``convert_(model, [swat, blpa])``, spec
``swat-u90+blpa4``): they convert in registry order into one :class:`ComposedController`.

Spec grammar: ``dense`` or ``PART[+PART...]``, each part one registered method's word (see
:func:`spec_help`); parsing happens here and nowhere else.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["Controller", "ComposedController", "Method", "register", "unregister", "registered", "method_for",
           "parse_method", "format_method", "spec_help", "FilterFn"]

FilterFn = Callable[[str, nn.Module], bool]

#: The methods that ship with leanprop, imported on first use (module path, attribute).
_BUILTIN = (("leanprop.swat.method", "METHOD"), ("leanprop.blpa.method", "METHOD"),
            ("leanprop.checkpointing.method", "METHOD"))


class Controller:
    """What drives one method during training; every method's controller derives from it.

    Call order per iteration: forward, backward, ``optimizer.step()``, ``controller.step()``;
    ``on_epoch_start(epoch)`` before each epoch; ``prepare(x)`` on a batch before a step whenever
    :attr:`needs_prepare` (e.g. SWAT times its sparse kernels there). The defaults do nothing, which is what
    plain PyTorch training (``dense``) needs.
    """

    #: the spec word of the method (``"dense"`` for this base class)
    name = "dense"
    #: how :meth:`training_flops` counts
    flops_basis = "as dense"

    # ------------------------------------------------------------------ training
    def unsupported_reason(self, mode: Any) -> str | None:
        """Why the method cannot train in ``mode`` (a :class:`leanprop.modes.ExecutionMode`), or None."""
        return None

    def attach_optimizer(self, optimizer: Any) -> None:
        """Give the method the optimizer (before the first step)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (0-based)."""

    def step(self) -> None:
        """Called after every ``optimizer.step()``."""

    @property
    def needs_prepare(self) -> bool:
        """Whether :meth:`prepare` should run on the next batch before its step."""
        return False

    def prepare(self, example_input: Any, *, progress: Callable[[str], None] | None = None,
                timer: Callable[[], float] | None = None, out_dir: Any = None) -> str | None:
        """Calibrate on a batch (inside the run's autocast context). ``out_dir``: where a table may be written.
        Returns one line for the log, or None."""
        return None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (resume)."""

    # ------------------------------------------------------------------ reporting
    def metrics(self) -> dict[str, Any]:
        """Per-epoch numbers for the metrics row (e.g. SWAT's measured sparsities)."""
        return {}

    def training_flops(self, model: nn.Module, input_shape: tuple[int, ...]) -> tuple[float, str]:
        """``(counted training FLOPs / dense, how they were counted)`` of the converted ``model`` (conv/linear
        MACs, :func:`leanprop.ops.flops.count_flops`)."""
        return 1.0, self.flops_basis

    def notes(self) -> dict[str, Any]:
        """Facts a benchmark record carries about this method's run (e.g. SWAT's kernel choice)."""
        return {}

    def summary(self) -> str:
        """The method's per-layer (or per-unit) table."""
        return ""

    def summary_lines(self, model: nn.Module, input_shape: tuple[int, ...], out_dir: Any = None) -> list[str]:
        """Lines for the end-of-run summary; ``out_dir``: where the full table may be written."""
        return []


class ComposedController(Controller):
    """Several methods on one model (``convert_(model, [cfg_a, cfg_b])``): every call goes to each part in order.

    ``parts`` holds the methods' own controllers; ``controller.swat`` (a method's name) is its part."""

    def __init__(self, parts: Sequence[Controller]):
        self.parts = list(parts)
        self.name = "+".join(p.name for p in self.parts)

    def __getattr__(self, name: str) -> Controller:
        for p in self.__dict__.get("parts", ()):
            if p.name == name:
                return p
        raise AttributeError(f"{type(self).__name__} has no attribute or method part {name!r}")

    def unsupported_reason(self, mode: Any) -> str | None:
        return next((r for p in self.parts if (r := p.unsupported_reason(mode))), None)

    def attach_optimizer(self, optimizer: Any) -> None:
        for p in self.parts:
            p.attach_optimizer(optimizer)

    def on_epoch_start(self, epoch: int) -> None:
        for p in self.parts:
            p.on_epoch_start(epoch)

    def step(self) -> None:
        for p in self.parts:
            p.step()

    @property
    def needs_prepare(self) -> bool:
        return any(p.needs_prepare for p in self.parts)

    def prepare(self, example_input: Any, **kw: Any) -> str | None:
        lines = [p.prepare(example_input, **kw) for p in self.parts if p.needs_prepare]
        return "; ".join(s for s in lines if s) or None

    def state_dict(self) -> dict[str, Any]:
        return {p.name: p.state_dict() for p in self.parts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {p.name for p in self.parts}
        if set(state) != names:
            raise ValueError(f"checkpoint method state is not a {self.name} state (keys {sorted(names)}); it was "
                             "trained with another method")
        for p in self.parts:
            p.load_state_dict(state[p.name])

    def metrics(self) -> dict[str, Any]:
        return {k: v for p in self.parts for k, v in p.metrics().items()}

    @property
    def flops_basis(self) -> str:  # type: ignore[override]
        return "; ".join(b for p in self.parts if (b := p.flops_basis) != Controller.flops_basis) or "as dense"

    def training_flops(self, model: nn.Module, input_shape: tuple[int, ...]) -> tuple[float, str]:
        """The parts' extra work added up (one part that changes FLOPs: its own count, unchanged)."""
        counted = [p.training_flops(model, input_shape) for p in self.parts]
        changed = [(r, how) for r, how in counted if r != 1.0]
        if not changed:
            return 1.0, self.flops_basis
        if len(changed) == 1:
            return changed[0]
        return 1.0 + sum(r - 1.0 for r, _ in changed), self.flops_basis

    def notes(self) -> dict[str, Any]:
        return {k: v for p in self.parts for k, v in p.notes().items()}

    def summary(self) -> str:
        return "\n\n".join(s for p in self.parts if (s := p.summary()))

    def summary_lines(self, model: nn.Module, input_shape: tuple[int, ...], out_dir: Any = None) -> list[str]:
        return [line for p in self.parts for line in p.summary_lines(model, input_shape, out_dir)]


@dataclass(frozen=True)
class Method:
    """One registered method.

    ``name``: its spec word and the ``RunConfig`` section holding its settings; ``config_type``: its config
    dataclass; ``order``: composition order (lower converts first and reverts last); ``convert(model, cfg,
    filter_fn, others)``: swap layers in place and return the controller (``others``: the configs converted with
    it); ``revert(model)``: undo it; ``is_converted(model)``; ``parse(word)``: a config for a spec word, None when
    the word is not this method's; ``spec_of(cfg)``: the word for a config; ``grammar``: the words it takes, for
    help texts; ``compresses_saved``: it stores saved activations compressed (other methods then keep theirs in a
    form it can compress, e.g. SWAT packs ``X_s``).
    """

    name: str
    config_type: type
    order: int
    convert: Callable[[nn.Module, Any, FilterFn | None, Sequence[Any]], Controller]
    revert: Callable[[nn.Module], None]
    is_converted: Callable[[nn.Module], bool]
    parse: Callable[[str], Any | None]
    spec_of: Callable[[Any], str]
    grammar: str
    compresses_saved: bool = False


_REGISTRY: dict[type, Method] = {}
_LOADED = False


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for module, attr in _BUILTIN:
        register(getattr(importlib.import_module(module), attr))


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a third-party method plugs in here); returns it."""
    for other in _REGISTRY.values():
        if other.name == method.name and other.config_type is not method.config_type:
            raise ValueError(f"a method named {method.name!r} is already registered ({other.config_type.__name__})")
    _REGISTRY[method.config_type] = method
    return method


def unregister(config_type: type) -> None:
    """Remove the method of ``config_type`` from the registry (tests, interactive work)."""
    _REGISTRY.pop(config_type, None)


def registered() -> list[Method]:
    """Every registered method, in composition order."""
    _load_builtin()
    return sorted(_REGISTRY.values(), key=lambda m: (m.order, m.name))


def method_for(config: Any) -> Method:
    """The registered method of a config object; ``TypeError`` naming the known configs otherwise."""
    _load_builtin()
    for cls in type(config).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    known = ", ".join(f"leanprop.{m.config_type.__name__}" for m in registered())
    raise TypeError(f"unsupported method config {type(config).__name__}; pass one of {known} (or a list of them)")


def spec_help() -> str:
    """The grammar, one line."""
    words = "; ".join(m.grammar for m in registered())
    return f"dense, or method words joined by '+': {words} (e.g. swat-u90, blpa4, swat-u90+blpa4)"


def _split(text: str) -> Iterator[str]:
    for part in text.split("+"):
        part = part.strip()
        if not part:
            raise ValueError(f"method {text!r}: empty part around '+'; use {spec_help()}")
        yield part


def parse_method(text: str) -> list[Any]:
    """The configs a method spec names, in composition order: ``"dense"`` -> ``[]``, ``"swat-u90"`` ->
    ``[SWATConfig.preset("u90")]``, ``"swat-u90+blpa4"`` -> ``[SWATConfig..., BLPAConfig(bits=4)]``.
    ``ValueError`` naming the grammar for anything else."""
    name = str(text).strip().lower()
    if name == "dense":
        return []
    configs: list[Any] = []
    for part in _split(name):
        for m in registered():
            try:
                cfg = m.parse(part)
            except ValueError as e:
                raise ValueError(f"method {text!r}: {e}") from None
            if cfg is not None:
                break
        else:
            close = difflib.get_close_matches(part, ["dense", *(m.name for m in registered())], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown method {text!r} (part {part!r}); use {spec_help()}.{hint}")
        if any(method_for(c) is m for c in configs):
            raise ValueError(f"method {text!r} names {m.name} twice")
        configs.append(cfg)
    return sorted(configs, key=lambda c: method_for(c).order)


def format_method(configs: Any) -> str:
    """The spec of a config or list of configs (``[]`` -> ``"dense"``); :func:`parse_method` reads it back."""
    items = list(configs) if isinstance(configs, (list, tuple)) else [configs]
    if not items:
        return "dense"
    return "+".join(method_for(c).spec_of(c) for c in sorted(items, key=lambda c: method_for(c).order))
