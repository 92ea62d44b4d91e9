"""Measured training memory: bytes kept for backward, peak memory of one step, and the largest batch that fits.

Three instruments (docs/methods/blpa.md, docs/benchmarks.md):

* :func:`saved_bytes` audits one training-mode forward pass: every tensor autograd keeps for backward is
  handed to a :class:`SavedTensorLedger` (through ``torch.autograd.graph.saved_tensors_hooks``, or through
  the saved-tensor codec of a BLPA-converted model, whose hooks are inner-most and would hide its tensors
  from ours).  Tensors are deduplicated by storage (the ReLU output that ReLU and the next conv both save
  counts once; a view keeps its whole storage alive), and the model's parameters and buffers are reported
  apart, since they exist whether or not backward runs.
* :func:`peak_memory` runs ONE training step (forward, cross-entropy, backward; no optimizer) in a fresh
  Python process (``python -m leanprop.accounting.memory_probe``) and reports its peak: the peak resident set
  size (``VmHWM`` reset just before the step, ``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` on
  CUDA.  A fresh process per measurement, because neither the allocator's cached memory nor ``ru_maxrss``
  ever goes down in a process.
* :func:`max_batch` finds the largest batch whose fresh-process peak fits a memory cap: doubling, then
  binary search; a probe that crashes or is killed (out of memory) counts as "does not fit".

Methods (``spec["method"]``): any method spec of :func:`leanprop.methods.parse_method` -- ``dense``,
``checkpoint``, ``blpa4``, ``swat-u90-packed``, ``swat-u90+blpa4``...
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanprop.ops.codec import find_codec

__all__ = [
    "KINDS", "METHODS", "SavedRecord", "SavedTensorLedger", "SavedBytesReport", "MaxBatchResult",
    "saved_bytes", "peak_memory", "max_batch", "normalize_spec", "apply_method", "build_model", "find_codec",
    "make_batch", "parse_size", "format_bytes",
]

#: The line prefix of the fresh-process probe's result (:mod:`leanprop.accounting.memory_probe`).
PROBE_MARKER = "LEANPROP_PROBE_RESULT "
#: Kinds of saved tensors, in display order.
KINDS = ("float", "codes", "mask", "index", "other", "parameter")
#: The methods the memory benchmark compares by default.
METHODS = ("dense", "checkpoint", "blpa8", "blpa4", "blpa2")
DTYPES = ("fp32", "bf16", "fp16")

_CODES = (torch.uint8, torch.int8)
_INDEX = (torch.int16, torch.int32, torch.int64)


# --------------------------------------------------------------------------------------------------------
# sizes


_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
          "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str | int) -> int:
    """Bytes in a size string: ``512MiB``, ``4GiB``, ``1.5GB`` (decimal), ``4G`` (binary, like ``ulimit``), ``1000``.

    Raises ``ValueError`` with an example of the accepted forms.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"bad size {text!r}: use a number with an optional unit, e.g. 512MiB, 4GiB, 1.5GB")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"bad size {text!r}: must be > 0 bytes")
    return value


def format_bytes(n: float | None) -> str:
    """``n`` bytes as B/KiB/MiB/GiB with one decimal (``-`` for None)."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------------------------------------
# the ledger


def _classify(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "mask"
    if t.dtype in _CODES:
        return "codes"
    if t.dtype in _INDEX:
        return "index"
    if t.is_floating_point():
        return "float"
    return "other"


def _storage(t: torch.Tensor) -> tuple[Any, int, Any]:
    """``(dedup key or None, storage bytes, storage object to keep alive or None)`` of a tensor."""
    try:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        nbytes = s.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested or storage-less subclasses
        return None, t.numel() * t.element_size(), None
    if ptr == 0:  # empty or meta storage: nothing to share
        return None, nbytes, None
    return (str(s.device), ptr), nbytes, s


@dataclass
class SavedRecord:
    """One tensor handed to the ledger. ``nbytes`` is its whole storage; ``duplicate`` rows share the storage of
    an earlier row and are not counted again; ``tensor_bytes`` is the view's own ``numel * element_size``."""

    kind: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    duplicate: bool
    tensor_bytes: int = 0
    origin: str = ""


class SavedTensorLedger:
    """What a forward pass keeps for backward, deduplicated by storage.

    ``record(t, kind=None)`` adds one saved tensor; ``kind`` None classifies it: ``parameter`` (shares the
    storage of a parameter or buffer of ``model``: model state, present anyway), ``float``, ``codes``
    (uint8/int8), ``mask`` (bool), ``index`` (int16/32/64) or ``other``.  A tensor sharing a parameter's
    storage is always ``parameter``, whatever kind the caller gives.  Each storage is counted once, with its
    full ``nbytes()``, under the kind of its first record.  The ledger keeps the storages it has seen alive
    until :meth:`release` so that a freed address cannot be mistaken for a duplicate.

    ``origin`` of a record: the class name of the innermost module running when it was saved (``watch(model)``
    keeps that stack; outside any module it is ``"(outside modules)"``), so :meth:`by_origin` tells which layers
    keep the bytes (a storage counts for the module that saved it first).
    """

    def __init__(self, model: nn.Module | None = None, parameters: Iterable[torch.Tensor] = ()):
        self.records: list[SavedRecord] = []
        self._param_keys: set[Any] = set()
        self._seen: set[Any] = set()
        self._alive: list[Any] = []
        self.raw_bytes = 0
        self._origins: list[str] = []
        if model is not None:
            self.add_parameters([*model.parameters(), *model.buffers()])
        self.add_parameters(parameters)

    def add_parameters(self, tensors: Iterable[torch.Tensor]) -> None:
        """Treat tensors sharing these tensors' storages as ``parameter``."""
        for t in tensors:
            key, _, _ = _storage(t)
            if key is not None:
                self._param_keys.add(key)

    @contextlib.contextmanager
    def watch(self, model: nn.Module):
        """Within the block, records carry the class name of the innermost running module of ``model``."""

        def enter(mod: nn.Module, args: Any) -> None:
            self._origins.append(type(mod).__name__)

        def leave(mod: nn.Module, args: Any, out: Any) -> None:
            if self._origins:
                self._origins.pop()

        handles = []
        try:
            for mod in model.modules():
                handles += [mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave)]
            yield self
        finally:
            for h in handles:
                h.remove()
            self._origins.clear()

    def record(self, t: torch.Tensor, kind: str | None = None) -> None:
        """Add one tensor kept for backward (see the class docstring for kinds and deduplication)."""
        key, nbytes, storage = _storage(t)
        if key is not None and key in self._param_keys:
            kind = "parameter"
        elif kind is None:
            kind = _classify(t)
        duplicate = key is not None and key in self._seen
        if key is not None and not duplicate:
            self._seen.add(key)
            self._alive.append(storage)
        tensor_bytes = t.numel() * t.element_size()
        if kind != "parameter":
            self.raw_bytes += tensor_bytes
        self.records.append(SavedRecord(kind, tuple(t.shape), str(t.dtype).removeprefix("torch."), nbytes,
                                        duplicate, tensor_bytes,
                                        self._origins[-1] if self._origins else "(outside modules)"))

    def release(self) -> None:
        """Drop the ledger's references to the recorded storages (the records stay)."""
        self._alive.clear()

    def by_kind(self) -> dict[str, int]:
        """Deduplicated bytes per kind, ``parameter`` included (it is not part of :attr:`total_bytes`)."""
        out: dict[str, int] = {}
        for r in self.records:
            if not r.duplicate:
                out[r.kind] = out.get(r.kind, 0) + r.nbytes
        return {k: out[k] for k in sorted(out, key=lambda k: (KINDS.index(k) if k in KINDS else len(KINDS), k))}

    def by_origin(self) -> dict[str, int]:
        """Deduplicated bytes per saving module class (parameters excluded), largest first."""
        out: dict[str, int] = {}
        for r in self.records:
            if not r.duplicate and r.kind != "parameter":
                out[r.origin] = out.get(r.origin, 0) + r.nbytes
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def total_bytes(self) -> int:
        """Deduplicated bytes kept for backward, parameters and buffers excluded."""
        return sum(r.nbytes for r in self.records if not r.duplicate and r.kind != "parameter")

    @property
    def parameter_bytes(self) -> int:
        return sum(r.nbytes for r in self.records if not r.duplicate and r.kind == "parameter")

    @property
    def num_saved(self) -> int:
        """Saved tensors other than parameters, duplicates included."""
        return sum(r.kind != "parameter" for r in self.records)

    @property
    def num_unique(self) -> int:
        """Distinct storages counted in :attr:`total_bytes`."""
        return sum(not r.duplicate and r.kind != "parameter" for r in self.records)

    def table(self, max_rows: int | None = None, include_parameters: bool = False) -> str:
        """A text table of the records (largest storages first when ``max_rows`` cuts it) and the totals."""
        rows = [(i, r) for i, r in enumerate(self.records) if include_parameters or r.kind != "parameter"]
        if max_rows is not None and len(rows) > max_rows:
            rows = sorted(sorted(rows, key=lambda ir: -ir[1].nbytes)[:max_rows])
        lines = [f"{'#':>5}  {'kind':<9} {'dtype':<9} {'shape':<24} {'bytes':>12}  dup"]
        for i, r in rows:
            lines.append(f"{i:>5}  {r.kind:<9} {r.dtype:<9} {str(list(r.shape)):<24} {r.nbytes:>12}  "
                         f"{'yes' if r.duplicate else ''}")
        kinds = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.by_kind().items())
        lines.append(f"total kept for backward: {format_bytes(self.total_bytes)} in {self.num_unique} storages "
                     f"({self.num_saved} saved tensors, {format_bytes(self.raw_bytes)} before dedup); by kind: "
                     f"{kinds or 'none'}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------------------------------------
# saved bytes of one forward pass


@dataclass
class SavedBytesReport:
    """Result of :func:`saved_bytes`. Bytes are deduplicated by storage unless named ``raw``.

    ``total_bytes``: kept for backward, parameters/buffers excluded; ``raw_bytes``: the dense-equivalent, the
    sum of every saved tensor's own bytes before deduplication (parameters excluded); ``by_kind``: deduplicated
    bytes per kind, ``parameter`` included; ``by_origin``: deduplicated bytes per class of the module that saved
    them (e.g. ``BatchNorm2d``: BN inputs), parameters excluded; ``via``: ``"hooks"`` or ``"codec"`` (the model's
    BLPA codec recorded what it keeps).
    """

    model: str | None
    input_shape: list[int]
    batch: int
    total_bytes: int
    raw_bytes: int
    parameter_bytes: int
    num_saved: int
    num_unique: int
    by_kind: dict[str, int]
    via: str
    codec: str | None = None
    by_origin: dict[str, int] = field(default_factory=dict)
    records: list[SavedRecord] = field(default_factory=list, repr=False)

    @property
    def bytes_per_sample(self) -> float:
        return self.total_bytes / self.batch if self.batch else float("nan")

    def to_dict(self, include_records: bool = False) -> dict[str, Any]:
        """JSON-serialisable dict (records only on request: a deep model saves thousands of tensors)."""
        d = asdict(self)
        d["bytes_per_sample"] = self.bytes_per_sample
        if include_records:
            d["records"] = [{**asdict(r), "shape": list(r.shape)} for r in self.records]
        else:
            del d["records"]
        return d

    def table(self, max_rows: int | None = 30) -> str:
        ledger = SavedTensorLedger()
        ledger.records = list(self.records)
        ledger.raw_bytes = self.raw_bytes
        return ledger.table(max_rows=max_rows)


def _default_loss(output: Any) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        output = output[0]
    return output.float().sum()


def saved_bytes(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor],
                loss_fn: Callable[[Any], torch.Tensor] | None = None, *, model_name: str | None = None,
                ledger: SavedTensorLedger | None = None) -> SavedBytesReport:
    """Bytes kept for backward by one training-mode forward pass of ``model(inputs)`` and its loss.

    ``inputs``: a tensor, or a tuple/list of positional inputs.  ``loss_fn(output)`` reduces the output to a
    scalar (default ``output.float().sum()``, which saves nothing itself).  Every tensor saved for backward is
    recorded in a :class:`SavedTensorLedger` by our ``saved_tensors_hooks`` (pack records and returns the
    tensor unchanged); when the model carries a BLPA saved-tensor codec, the forward also runs under
    ``codec.recording(ledger)``: the codec's hooks are inner-most, so it records what it keeps (codes, masks,
    tensors it leaves as they are), and ours still see anything saved outside them (e.g. by the loss).
    Backward runs afterwards so the graph is freed; gradients, BN running statistics (all buffers) and the
    module's train/eval mode are restored, so the model is left as it was.
    """
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not args:
        raise ValueError("saved_bytes: no inputs")
    loss_fn = loss_fn or _default_loss
    ledger = ledger if ledger is not None else SavedTensorLedger(model)
    codec = find_codec(model)
    was_training = model.training
    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ledger.record(t)
        return t

    try:
        for p in params:
            p.grad = None
        model.train()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ledger.watch(model):
            inner = codec.recording(ledger) if codec is not None else contextlib.nullcontext()
            with inner:
                output = model(*args)
                loss = loss_fn(output)
        report = SavedBytesReport(
            model=model_name, input_shape=list(args[0].shape), batch=int(args[0].shape[0]) if args[0].dim() else 1,
            total_bytes=ledger.total_bytes, raw_bytes=ledger.raw_bytes, parameter_bytes=ledger.parameter_bytes,
            num_saved=ledger.num_saved, num_unique=ledger.num_unique, by_kind=ledger.by_kind(),
            via="codec" if codec is not None else "hooks",
            codec=None if codec is None else type(codec).__name__, by_origin=ledger.by_origin(),
            records=list(ledger.records))
        if loss.requires_grad:
            loss.backward()
        del output, loss
    finally:
        ledger.release()
        model.train(was_training)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
    return report


# --------------------------------------------------------------------------------------------------------
# benchmark specs: model + method


def apply_method(model: nn.Module, method: str) -> Any:
    """Prepare ``model`` in place for the method spec ``method`` (:func:`leanprop.methods.parse_method`) and
    return its :class:`~leanprop.methods.Controller` (dense: the base controller). ``ValueError`` for an unknown
    spec, or a model the method cannot convert (e.g. ``checkpoint`` on a model without residual blocks)."""
    from leanprop.methods import parse_method
    from leanprop.nn.convert import convert_

    return convert_(model, parse_method(method))


_SPEC_KEYS = ("model", "model_kwargs", "input_shape", "num_classes", "method", "device", "threads", "dtype",
              "channels_last", "seed")
#: how a model of one's own is named where a registry name is expected
FACTORY_FORMS = "package.module:factory or path/to/file.py:factory"
_FACTORY_INPUT_SHAPE = (3, 32, 32)
_INFERRED_CLASSES: dict[tuple, int] = {}


def is_factory_ref(model: Any) -> bool:
    """Whether a spec's ``model`` names a factory of one's own (``package.module:factory``,
    ``path/to/file.py:factory``) rather than a registry name (registry names have no ``:``)."""
    return isinstance(model, str) and ":" in model


def _factory_ref(ref: str) -> tuple[str, str, bool]:
    """``(module or absolute file path, attribute path, is a file)`` of a factory reference."""
    target, _, attr = ref.strip().rpartition(":")
    if not target or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise ValueError(f"model {ref!r}: use a registry name (see `leanprop models`) or {FACTORY_FORMS}")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    if is_file:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"model {ref!r}: no file {path}; give an existing path/to/file.py:factory")
        target = str(path)
    elif not all(part.isidentifier() for part in target.split(".")):
        raise ValueError(f"model {ref!r}: {target!r} is not a module name; use {FACTORY_FORMS}")
    return target, attr, is_file


def resolve_factory(ref: str) -> tuple[str, Callable[..., nn.Module]]:
    """``(canonical reference, factory)`` of ``package.module:factory`` or ``path/to/file.py:factory`` (the
    canonical form has the file's absolute path, so a fresh-process probe started anywhere finds it).

    A module is imported with the working directory on ``sys.path`` (appended, as ``python -m`` would have it);
    a file is loaded once per process under a private module name (its ``if __name__ == "__main__":`` block does
    not run), with its own directory on ``sys.path`` while it loads. ``ImportError`` / ``ValueError`` naming the
    fix when the module cannot be imported or has no such callable."""
    import importlib
    import importlib.util

    target, attr, is_file = _factory_ref(ref)
    if is_file:
        name = "_leanprop_user_model_" + re.sub(r"\W", "_", target)
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, target)
            if loader_spec is None or loader_spec.loader is None:
                raise ImportError(f"model {ref!r}: cannot load {target} as Python source")
            module = importlib.util.module_from_spec(loader_spec)
            folder = str(Path(target).parent)
            added = folder not in sys.path
            if added:
                sys.path.insert(0, folder)
            sys.modules[name] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise ImportError(f"model {ref!r}: importing {target} failed: {type(e).__name__}: {e}; fix that "
                                  "file (it must import on its own)") from e
            finally:
                if added and folder in sys.path:
                    sys.path.remove(folder)
        canonical = f"{target}:{attr}"
    else:
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ImportError(f"model {ref!r}: cannot import {target!r} ({e}); install it, run from the directory "
                              f"that holds it or add that directory to PYTHONPATH, or name the file: "
                              f"path/to/{target.replace('.', '/')}.py:{attr}") from e
        except Exception as e:
            raise ImportError(f"model {ref!r}: importing {target} failed: {type(e).__name__}: {e}; fix that module "
                              "(it must import on its own)") from e
        canonical = f"{target}:{attr}"
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {ref!r}: {target} has no attribute {attr!r}; name a function or class there "
                             "that returns the torch.nn.Module")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model {ref!r}: {attr} is a {type(obj).__name__}, not callable; name a function or class "
                         "that returns the torch.nn.Module")
    return canonical, obj


def _factory_params(factory: Callable[..., Any]) -> dict[str, Any]:
    import inspect

    try:
        return dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        return {}


def _call_factory(ref: str, factory: Callable[..., Any], kwargs: dict[str, Any], num_classes: int | None,
                  in_channels: int) -> nn.Module:
    """``factory(**kwargs)``, with ``num_classes`` (when not None) and ``in_channels`` added where its signature
    names them; ``ValueError`` naming the fix when the call fails or does not return a ``torch.nn.Module``."""
    params = _factory_params(factory)
    call = dict(kwargs)
    if "num_classes" in params and num_classes is not None:
        call.setdefault("num_classes", num_classes)
    if "in_channels" in params:
        call.setdefault("in_channels", in_channels)
    shown = ", ".join(f"{k}={v!r}" for k, v in call.items())
    try:
        model = factory(**call)
    except Exception as e:
        raise ValueError(f"model {ref!r}: calling {ref.rpartition(':')[2]}({shown}) failed: "
                         f"{type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {ref!r}: {ref.rpartition(':')[2]}({shown}) returned a value of type "
                         f"{type(model).__name__}, not a torch.nn.Module; make the factory return the model (e.g. "
                         "`return MyNet()`)")
    return model


def _factory_num_classes(ref: str, factory: Callable[..., Any], kwargs: dict[str, Any],
                         input_shape: list[int]) -> int:
    """Classes of a factory's model when the spec gives none: its ``num_classes`` default, 10 when it takes a
    ``num_classes`` without default, else the last dimension of the output for one sample (cached)."""
    p = _factory_params(factory).get("num_classes")
    if p is not None:
        return int(p.default) if isinstance(p.default, int) and p.default > 0 else 10
    key = (ref, json.dumps(kwargs, sort_keys=True, default=str), tuple(input_shape))
    if key not in _INFERRED_CLASSES:
        model = _call_factory(ref, factory, kwargs, None, input_shape[0]).eval()
        with torch.no_grad():
            out = model(torch.zeros(1, *input_shape))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ValueError(f"model {ref!r}: the benchmarks train on cross-entropy and need logits of shape "
                             f"(batch, classes); the model returns {getattr(out, 'shape', type(out).__name__)}")
        _INFERRED_CLASSES[key] = int(out.shape[-1])
    return _INFERRED_CLASSES[key]


def normalize_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A complete, validated copy of a benchmark spec (JSON-serialisable).

    Keys: ``model`` (required: a registry name, or a model of one's own, ``package.module:factory`` or
    ``path/to/file.py:factory``, see :func:`resolve_factory`), ``model_kwargs`` ({}), ``input_shape`` (per sample;
    default ``[3, S, S]`` with the model's input size, ``[3, 32, 32]`` for a factory), ``num_classes`` (the
    model's default; for a factory its ``num_classes`` default, else read off its output), ``method`` (dense),
    ``device`` ("cpu"; "auto" picks cuda when available), ``threads`` (None: torch's default), ``dtype``
    ("fp32"; "bf16"/"fp16" run under autocast), ``channels_last`` (False), ``seed`` (0).
    """
    from leanprop import models

    unknown = sorted(set(spec) - set(_SPEC_KEYS) - {"batch"})
    if unknown:
        raise ValueError(f"unknown spec key(s) {unknown}; known: {', '.join(_SPEC_KEYS)}")
    if "model" not in spec:
        raise ValueError(f"spec needs a 'model' (a leanprop.models registry name, or {FACTORY_FORMS})")
    kwargs = dict(spec.get("model_kwargs") or {})
    if is_factory_ref(spec["model"]):
        name, factory = resolve_factory(spec["model"])
        shape = [int(v) for v in (spec.get("input_shape") or _FACTORY_INPUT_SHAPE)]
        if any(v < 1 for v in shape):
            raise ValueError(f"input_shape must be positive, got {shape}")
        classes = int(spec.get("num_classes") or _factory_num_classes(name, factory, kwargs, shape))
    else:
        try:
            info = models.model_info(spec["model"])
        except ValueError as e:
            raise ValueError(f"{e} (a model of your own: {FACTORY_FORMS})") from None
        name = info.name
        shape = [int(v) for v in (spec.get("input_shape") or (3, info.input_size, info.input_size))]
        classes = int(spec.get("num_classes") or info.default_num_classes)
    out = {
        "model": name,
        "model_kwargs": kwargs,
        "input_shape": shape,
        "num_classes": classes,
        "method": str(spec.get("method", "dense")).strip().lower(),
        "device": str(spec.get("device") or "cpu"),
        "threads": None if spec.get("threads") is None else int(spec["threads"]),
        "dtype": str(spec.get("dtype") or "fp32"),
        "channels_last": bool(spec.get("channels_last", False)),
        "seed": int(spec.get("seed", 0)),
    }
    from leanprop.methods import parse_method

    parse_method(out["method"])
    if out["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {out['dtype']!r}")
    if out["device"] == "auto":
        out["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(out["device"])
    except RuntimeError as e:
        raise ValueError(f"bad device {out['device']!r} ({e})") from None
    if out["threads"] is not None and out["threads"] < 1:
        raise ValueError(f"threads must be >= 1, got {out['threads']}")
    if any(v < 1 for v in out["input_shape"]):
        raise ValueError(f"input_shape must be positive, got {out['input_shape']}")
    return out


def build_model(spec: dict[str, Any]) -> tuple[nn.Module, Any]:
    """``(model, handle)``: the spec's model on its device, in training mode, prepared for its method
    (``handle`` is what :func:`apply_method` returned).  Seeded with ``spec["seed"]``.  A factory's model
    (``package.module:factory``) is built by calling it with ``num_classes`` and ``in_channels`` (the input's
    channels) where its signature names them, and the spec's ``model_kwargs``."""
    from leanprop import models

    spec = normalize_spec(spec)
    torch.manual_seed(spec["seed"])
    if is_factory_ref(spec["model"]):
        ref, factory = resolve_factory(spec["model"])
        model = _call_factory(ref, factory, spec["model_kwargs"], spec["num_classes"], spec["input_shape"][0])
    else:
        model = models.create(spec["model"], num_classes=spec["num_classes"], **spec["model_kwargs"])
    device = torch.device(spec["device"])
    model.to(device)
    if spec["channels_last"]:
        model.to(memory_format=torch.channels_last)
    handle = apply_method(model, spec["method"])
    model.to(device)
    model.train()
    return model, handle


def make_batch(spec: dict[str, Any], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random input batch and random targets for ``spec`` (seeded)."""
    g = torch.Generator().manual_seed(spec.get("seed", 0) + 1)
    x = torch.randn(batch, *spec["input_shape"], generator=g)
    y = torch.randint(0, spec["num_classes"], (batch,), generator=g)
    device = torch.device(spec["device"])
    x, y = x.to(device), y.to(device)
    if spec.get("channels_last") and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


# --------------------------------------------------------------------------------------------------------
# peak memory of one step in a fresh process


def _probe_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _crash_message(rc: int, stderr: str) -> str:
    if rc < 0:
        try:
            import signal

            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"probe killed by {name}" + (" (out of memory?)" if -rc == 9 else "")
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return f"probe exited with status {rc}: {lines[-1] if lines else 'no message'}"


def peak_memory(spec: dict[str, Any], batch: int, *, abort_above_bytes: int | None = None,
                timeout: float | None = None, warmup: bool = True) -> dict[str, Any]:
    """Peak memory of ONE training step (forward, cross-entropy, backward) at ``batch``, in a fresh process.

    ``warmup``: first run one step on a batch of 2, so one-time costs (lazy imports such as the first
    ``torch.utils.checkpoint`` call, ~100 MiB; kernel and thread-pool set-up) count in ``rss_before_bytes``, not
    in the step.

    CPU: ``rss_before_bytes`` (resident set just before the forward, model and batch built),
    ``step_peak_rss_bytes`` (peak resident set during the step: ``VmHWM`` after resetting it just before the
    step via ``/proc/self/clear_refs``; ``ru_maxrss`` where that is unavailable), ``step_peak_growth_bytes``
    (the two subtracted: the step's own peak growth), ``ru_maxrss_bytes`` (``getrusage``; caution: Linux carries
    the parent's peak across fork+exec into it, so a child of a large process reports at least that) and
    ``peak_bytes`` (the process's own peak over its life from ``VmHWM``: what a memory cap sees).
    CUDA: ``alloc_before_bytes``, ``max_allocated_bytes`` (``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats``), ``step_peak_growth_bytes``, ``max_reserved_bytes``; ``peak_bytes`` is the
    max allocated.  ``abort_above_bytes`` stops the probe as soon as it is exceeded (a CPU watchdog thread;
    ``set_per_process_memory_fraction`` on CUDA).  Always returns a dict with ``ok``; a probe that crashes,
    is killed or runs out of memory gives ``ok: False`` and ``error``.
    """
    spec = normalize_spec(spec)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    payload = {**spec, "batch": int(batch), "abort_above_bytes": abort_above_bytes, "warmup": warmup}
    cmd = [sys.executable, "-m", "leanprop.accounting.memory_probe", json.dumps(payload)]
    base = {"ok": False, "batch": int(batch), "method": spec["method"], "device": spec["device"],
            "peak_bytes": None}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_probe_env(spec["threads"]))
    except subprocess.TimeoutExpired:
        return {**base, "error": f"probe timed out after {timeout} s"}
    result = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PROBE_MARKER):
            result = json.loads(line[len(PROBE_MARKER):])
            break
    if result is None:
        return {**base, "returncode": proc.returncode, "error": _crash_message(proc.returncode, proc.stderr)}
    return {**base, **result, "returncode": proc.returncode}


# --------------------------------------------------------------------------------------------------------
# largest batch under a cap


@dataclass
class MaxBatchResult:
    """Result of :func:`max_batch`: ``batch`` (the largest batch that fitted; 0 when none did), ``fails`` (the
    smallest batch seen not to fit; None when the search hit ``limit``), the ``probes`` made in order
    (``batch``, ``fits``, ``peak_bytes``, ``error``) and ``hit_limit`` (the search stopped at ``limit``).  With a
    ``tolerance`` the true maximum lies in ``[batch, fails)``."""

    batch: int
    cap_bytes: int
    probes: list[dict[str, Any]]
    hit_limit: bool = False
    fails: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def max_batch(spec: dict[str, Any] | None, mem_cap_bytes: int, *, start: int = 1, limit: int = 1 << 16,
              probe: Callable[[int], dict[str, Any] | None] | None = None, timeout: float | None = None,
              on_probe: Callable[[dict[str, Any]], None] | None = None, tolerance: float = 0.0) -> MaxBatchResult:
    """The largest batch whose one-step peak (``peak_bytes``: process peak RSS on CPU, max allocated on CUDA)
    is at most ``mem_cap_bytes``.

    From ``start`` (a guess, e.g. from the saved-bytes audit): doubling while a batch fits (up to ``limit``), or
    halving until one does, then binary search between the last fitting and the first failing batch, assuming
    memory grows with the batch.  ``tolerance`` > 0 stops the search once the failing batch is within
    ``tolerance`` (relative) of the fitting one (fewer probes of the largest, slowest batches); 0 finds the
    exact largest batch.  Each probe is a fresh process (:func:`peak_memory`, stopped early once above the
    cap); ``probe(batch) -> dict`` replaces it (tests, other devices).  A probe that returns None, ``ok: False``
    (crash, OOM kill) or no ``peak_bytes`` does not fit.
    """
    if mem_cap_bytes <= 0:
        raise ValueError(f"memory cap must be > 0 bytes, got {mem_cap_bytes}")
    if not 1 <= start <= limit:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    if probe is None:
        if spec is None:
            raise ValueError("max_batch needs a spec or a probe function")

        def probe(b: int) -> dict[str, Any]:
            return peak_memory(spec, b, abort_above_bytes=mem_cap_bytes, timeout=timeout)

    probes: list[dict[str, Any]] = []

    def fits(b: int) -> bool:
        r = probe(b) or {}
        peak = r.get("peak_bytes")
        ok = r.get("ok", True) and peak is not None and peak <= mem_cap_bytes
        row = {"batch": b, "fits": bool(ok), "peak_bytes": peak, "error": r.get("error")}
        probes.append(row)
        if on_probe is not None:
            on_probe(row)
        return bool(ok)

    lo, hi = (start, None) if fits(start) else (0, start)
    while lo == 0 and hi > 1:  # the guess was too big: halve until a batch fits
        b = hi // 2
        lo, hi = (b, hi) if fits(b) else (0, b)
    if lo == 0:
        return MaxBatchResult(0, mem_cap_bytes, probes, fails=hi)
    while hi is None:
        if lo >= limit:
            return MaxBatchResult(lo, mem_cap_bytes, probes, hit_limit=True)
        b = min(2 * lo, limit)
        if fits(b):
            lo = b
        else:
            hi = b
    while hi - lo > max(1, int(tolerance * lo)):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return MaxBatchResult(lo, mem_cap_bytes, probes, fails=hi)
