"""Name -> constructor registry for the model zoo.

Model modules decorate a factory function with :func:`register`; users build models with
:func:`create` and discover them with :func:`list_models` / :func:`model_info`.

A factory must accept ``num_classes`` and ``in_channels`` (the image channels: 3 for RGB, 1 for
grayscale) as keyword arguments and spell out every other option it supports as an explicit keyword
argument (no ``**kwargs``), so that :func:`create` can reject misspelled options with a readable
``ValueError`` before anything is built.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ._options import check_in_channels, check_num_classes

__all__ = ["ModelInfo", "register", "create", "list_models", "model_info", "FAMILIES"]

#: Allowed families and the input resolution (square images) each one is designed for.
FAMILIES: dict[str, int] = {"cifar": 32, "imagenet": 224}
_DEFAULT_NUM_CLASSES: dict[str, int] = {"cifar": 10, "imagenet": 1000}


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about a registered model."""

    name: str
    family: str
    input_size: int
    description: str

    @property
    def default_num_classes(self) -> int:
        """Number of classes used by :func:`create` when none is given (10 or 1000)."""
        return _DEFAULT_NUM_CLASSES[self.family]


@dataclass(frozen=True)
class _Entry:
    info: ModelInfo
    factory: Callable[..., nn.Module]


_REGISTRY: dict[str, _Entry] = {}


def register(
    name: str, *, family: str, input_size: int, description: str
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``factory`` under ``name``.

    ``family`` is ``"cifar"`` (32x32 inputs, 10 classes by default) or ``"imagenet"``
    (224x224 inputs, 1000 classes by default).  The factory is returned unchanged.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"model name must be a non-empty string without surrounding spaces, got {name!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    if input_size != FAMILIES[family]:
        raise ValueError(
            f"input_size for family {family!r} must be {FAMILIES[family]}, got {input_size!r}"
        )
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"model {name!r} needs a non-empty description")

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        params = inspect.signature(factory).parameters
        for required in ("num_classes", "in_channels"):
            if required not in params:
                raise TypeError(f"factory for {name!r} must accept a {required!r} keyword argument")
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            raise TypeError(f"factory for {name!r} must list its options explicitly (no **kwargs)")
        info = ModelInfo(name=name, family=family, input_size=input_size, description=description.strip())
        _REGISTRY[name] = _Entry(info=info, factory=factory)
        return factory

    return decorator


def _closest(name: str, candidates: list[str]) -> str | None:
    """Closest candidate by difflib similarity (case-insensitive); ties go to the candidate with
    more characters in the same positions (so a typo'd "resnet2O" maps to "resnet20")."""
    query = name.lower()
    by_lower = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(query, list(by_lower), n=5, cutoff=0.5)
    if not close:
        return None

    def score(c: str) -> tuple[float, int, int]:
        ratio = difflib.SequenceMatcher(None, query, c).ratio()
        same_place = sum(a == b for a, b in zip(query, c, strict=False))
        return (ratio, same_place, -abs(len(c) - len(query)))

    return by_lower[max(close, key=score)]


def _unknown_name_error(name: object) -> ValueError:
    available = sorted(_REGISTRY)
    msg = f"unknown model {name!r}."
    if isinstance(name, str) and available:
        guess = _closest(name, available)
        if guess is not None:
            msg += f" Did you mean {guess!r}?"
    msg += " Available models: " + ", ".join(available)
    return ValueError(msg)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise _unknown_name_error(name) from None


def model_info(name: str) -> ModelInfo:
    """Return the :class:`ModelInfo` of a registered model (``ValueError`` if unknown)."""
    return _entry(name).info


def list_models(family: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally restricted to one family."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be None or one of {sorted(FAMILIES)}, got {family!r}")
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.info.family == family)


def create(name: str, num_classes: int | None = None, *, in_channels: int = 3, **kwargs: object) -> nn.Module:
    """Build the model registered as ``name``.

    ``num_classes`` defaults to 10 for the ``cifar`` family and 1000 for ``imagenet``; ``in_channels``
    is the number of image channels of the input (3: RGB, 1: grayscale; the trainer takes it from the data).
    Further keyword arguments are model options (e.g. ``conv_bias=True`` for
    ``cifar_resnet18``, ``shortcut="pad"`` for the CIFAR pre-activation ResNets); an option
    the model does not take, or an invalid value, raises ``ValueError``.
    """
    entry = _entry(name)
    if num_classes is None:
        num_classes = entry.info.default_num_classes
    check_num_classes(num_classes)
    check_in_channels(in_channels)

    params = inspect.signature(entry.factory).parameters
    accepted = [p for p in params if p not in ("num_classes", "in_channels")]
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown:
        opts = ", ".join(accepted) if accepted else "none"
        raise ValueError(f"model {name!r} got unexpected option(s) {unknown}; accepted options: {opts}")
    return entry.factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
