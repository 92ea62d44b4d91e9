"""Run configuration: nested dataclasses, strict YAML loading and ``--set key.path=value`` overrides.

Unknown keys are errors (with a did-you-mean hint), so a typo in a config never silently falls back
to a default. ``method.name`` picks the back-propagation method; its settings live in the method's own
top-level section (``swat:``, ``blpa:``), which may only be present when that method is used.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from leanprop.blpa.config import BLPAConfig
from leanprop.swat.config import SWATConfig


@dataclass
class DataConfig:
    """Where the data lives and how batches are made."""

    name: str = "cifar10"  # cifar10 | cifar100 | npz | folder | imagenet | synthetic
    root: str | None = None  # data dir; None: $LEANPROP_DATA, then the user cache dir
    source: str = "auto"  # cifar10: auto | pickle (cifar-10-batches-py) | jpeg (shared JPEG tree)
    path: str | None = None  # npz file (npz) or dataset folder (folder / imagenet); default: under root
    download: bool = False  # download the official CIFAR archive when it is missing
    batch_size: int = 128  # per process (DDP: per rank)
    eval_batch_size: int = 500
    augment: bool = True  # small images: pad-4 crop + flip; ImageNet: random-resized crop + flip
    val_split: int = 0  # images held out of the training set for validation / model selection
    limit_train: int | None = None  # use only the first N training images (smoke runs)
    limit_eval: int | None = None
    workers: int = 0  # DataLoader workers for file-backed datasets
    image_size: int = 224  # ImageNet-style crop size
    resize_size: int = 256  # ImageNet-style eval resize (shorter side)
    synthetic_train: int = 1024  # sizes of the synthetic smoke-test dataset
    synthetic_test: int = 256
    synthetic_classes: int = 10
    synthetic_size: int = 32


@dataclass
class ModelConfig:
    name: str = "resnet20"
    num_classes: int | None = None  # None: taken from the dataset
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    wd_exclude_bn_bias: bool = False  # no weight decay on BatchNorm parameters and biases
    label_smoothing: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # adamw only


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, evaluated per iteration (see ``leanprop.train.schedules``)."""

    name: str = "multistep"  # constant | multistep | cosine | piecewise
    milestones: list[int] = field(default_factory=lambda: [50, 100])  # epochs (multistep)
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up lr*(it+1)/(T+1) over this many epochs
    boundaries: list[int] = field(default_factory=list)  # iterations (piecewise)
    values: list[float] = field(default_factory=list)  # lrs (piecewise): len(boundaries) + 1
    min_lr: float = 0.0  # cosine floor


@dataclass
class TrainConfig:
    epochs: int = 150
    max_steps: int | None = None  # stop after this many optimizer steps in total (smoke runs)
    amp: str | None = None  # None | bf16 | fp16 (fp16 needs a GPU; uses GradScaler)
    channels_last: bool = False
    compile: bool = False
    eval_every: int = 1  # epochs
    save_best: str = "none"  # none | val (never the test set)
    grad_clip: float | None = None
    tensorboard: bool = False
    progress: bool | str = "auto"  # auto (only on a TTY) | on | off (YAML reads on/off as true/false)
    deterministic: bool = False


#: The top-level sections that hold a method's settings, by method name (leanprop.methods). A section overlays the
#: config its method's spec word names: ``method.name=swat-u90`` + ``swat: {topk_period: 10}``.
METHOD_SECTIONS: dict[str, type] = {"swat": SWATConfig, "blpa": BLPAConfig}


@dataclass
class MethodConfig:
    """Which back-propagation method trains the model, as a method spec (:func:`leanprop.methods.parse_method`):
    ``dense``, ``checkpoint``, ``swat``, ``swat-u90``, ``blpa4``, ``swat-u90+blpa4``...; a top-level ``swat:`` /
    ``blpa:`` section overrides settings of the config the spec names."""

    name: str = "dense"


@dataclass
class RunConfig:
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None: PyTorch's default
    # glibc malloc's mmap threshold, e.g. 256KiB: freed activations leave the resident set at once, so the peak
    # follows the bytes in use (leanprop.allocator); None: the C library's default (a threshold that rises)
    malloc_mmap_threshold: int | str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_dir: str = "runs"
    run_name: str | None = None  # None: <model>-<dataset>-<method>-<timestamp>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    swat: SWATConfig | None = None  # overrides the SWAT config method.name names (swat, swat-u90, swat-u90+blpa4...)
    blpa: BLPAConfig | None = None  # overrides the BLPA config method.name names (blpa, blpa4, swat-u90+blpa4...)


def method_configs(cfg: RunConfig) -> list[Any]:
    """The method configs ``convert_`` needs for ``cfg.method.name`` (``[]`` for dense), each replaced by its
    section when there is one (:func:`from_dict` put the spec's config, with the section's keys on top, there)."""
    return [getattr(cfg, _section_of(c), None) or c for c in _parse_spec(cfg.method.name)]


def _parse_spec(name: str) -> list[Any]:
    from leanprop.methods import parse_method

    try:
        return parse_method(name)
    except ValueError as e:
        raise ConfigError(f"method.name={name!r}: {e}") from None


def _section_of(config: Any) -> str:
    from leanprop.methods import method_for

    return method_for(config).name


def _overlay_method_sections(data: dict) -> None:
    """Every method of the spec with a section gets its whole config there: the spec word's config (e.g. the
    ``swat-u90`` preset) with the section's keys, if any, on top (so a run's ``config.yaml`` shows what trained)."""
    spec = (data.get("method") or {}).get("name", "dense")
    if not isinstance(spec, str):
        raise ConfigError(f"method.name: expected a method spec string, got {spec!r}")
    for config in _parse_spec(spec):
        section = _section_of(config)
        if section in METHOD_SECTIONS and isinstance(data.get(section) or {}, dict):
            data[section] = {**to_dict(config), **(data.get(section) or {})}


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says how to fix it."""


def _hint(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(choices))}."


def _value_hint(value: Any, choices: tuple) -> str:
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys, got {value!r}")
        return _from_dict(tp, value, where)
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _from_dict(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"Unknown config key '{path}'.{_hint(key, names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def to_dict(cfg: Any) -> dict:
    """Plain-Python (YAML-safe) view of a config dataclass."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def from_dict(data: dict) -> RunConfig:
    data = dict(data or {})
    _overlay_method_sections(data)
    cfg = _from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got '{item}' (e.g. --set train.epochs=3)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set: empty key in '{item}'")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from e
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: '{p}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def load(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (optional), apply overrides, validate. Raises ConfigError / FileNotFoundError."""
    data = _read_yaml(Path(path)) if path is not None else {}
    apply_overrides(data, overrides or [])
    return from_dict(data)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(p: Path, seen: tuple[Path, ...] = ()) -> dict:
    """One config file; a ``base: other.yaml`` entry (relative to this file) is loaded first and merged under."""
    if not p.is_file():
        raise FileNotFoundError(f"Config file not found: {p}. Configs ship in the repository's configs/ folder.")
    if p.resolve() in seen:
        raise ConfigError(f"{p}: 'base:' files include each other in a loop")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (data:, model:, ...)")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{p}: 'base' must be a path to another YAML config")
    return _deep_merge(_read_yaml(p.parent / base, (*seen, p.resolve())), data)


_CHOICES = {
    "data.name": ("cifar10", "cifar100", "npz", "folder", "imagenet", "synthetic"),
    "data.source": ("auto", "pickle", "jpeg"),
    "optim.name": ("sgd", "adamw"),
    "schedule.name": ("constant", "multistep", "cosine", "piecewise"),
    "train.save_best": ("none", "val"),
    "train.progress": ("auto", "on", "off", True, False),
}


def validate(cfg: RunConfig) -> None:
    """Cross-field checks with messages that name the fix."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}."
                              + _value_hint(value, choices))
    if cfg.train.amp not in (None, "bf16", "fp16"):
        raise ConfigError(f"train.amp={cfg.train.amp!r}: use null, bf16 or fp16")
    if cfg.data.batch_size < 1 or cfg.data.eval_batch_size < 1:
        raise ConfigError("data.batch_size and data.eval_batch_size must be >= 1")
    if cfg.train.epochs < 1:
        raise ConfigError("train.epochs must be >= 1")
    if cfg.optim.lr <= 0:
        raise ConfigError("optim.lr must be > 0")
    if cfg.train.save_best == "val" and cfg.data.val_split <= 0:
        raise ConfigError("train.save_best=val needs a validation split: set data.val_split (e.g. 5000)")
    s = cfg.schedule
    if s.name == "piecewise" and len(s.values) != len(s.boundaries) + 1:
        raise ConfigError("schedule piecewise: 'values' needs exactly one more entry than 'boundaries'")
    if s.name == "piecewise" and list(s.boundaries) != sorted(s.boundaries):
        raise ConfigError("schedule piecewise: 'boundaries' must be increasing iteration numbers")
    if s.warmup_epochs < 0:
        raise ConfigError("schedule.warmup_epochs must be >= 0")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError("threads must be >= 1")
    if cfg.malloc_mmap_threshold is not None:
        malloc_mmap_threshold_bytes(cfg)
    used = {_section_of(c) for c in _parse_spec(cfg.method.name)}
    for section in METHOD_SECTIONS:
        if getattr(cfg, section) is not None and section not in used:
            from leanprop.methods import method_for

            words = [w.strip() for w in cfg.method.name.split("+") if w.strip() != "dense"] + [section]
            fix = "+".join(sorted(words, key=lambda w: method_for(_parse_spec(w)[0]).order))
            raise ConfigError(f"a {section}: section is set but method.name={cfg.method.name!r} does not use "
                              f"{section}: set method.name={fix} (or remove the {section}: section)")
    if cfg.data.name == "npz" and not cfg.data.path:
        raise ConfigError("data.name=npz needs data.path: the .npz file with x_train, y_train, x_test, y_test")


def malloc_mmap_threshold_bytes(cfg: RunConfig) -> int | None:
    """``cfg.malloc_mmap_threshold`` in bytes (``256KiB``, ``262144``), None when unset; ``ConfigError`` when bad."""
    if cfg.malloc_mmap_threshold is None:
        return None
    from leanprop.accounting.memory import parse_size
    from leanprop.allocator import check_mmap_threshold

    try:
        return check_mmap_threshold(parse_size(cfg.malloc_mmap_threshold))
    except ValueError as e:
        raise ConfigError(f"malloc_mmap_threshold: {e}") from None
