"""``leanprop.profile``: every method on a model of one's own, in one call.

    import leanprop
    records = leanprop.profile("mypackage.models:make_net", torch.randn(64, 3, 32, 32), mem_cap="4GiB")

For each method spec (:func:`leanprop.methods.parse_method`; ``dense`` is always measured, as the baseline):

* a deep copy of the model (the model given is never modified), converted with
  ``leanprop.convert_(copy, leanprop.parse_method(spec))``; a method that cannot convert the model gives a record
  with ``error`` (and a table row saying why), never an exception;
* the bytes kept for backward by one training forward (:func:`leanprop.accounting.memory.saved_bytes`), by kind
  (float, codes, mask, ...) and by the class of the module that saved them, and the ratio to dense;
* the training step time (forward, loss, backward, SGD step, ``controller.step()``), every method interleaved
  round by round in one run (:func:`leanprop.timing.interleaved`) and divided by the dense step of that run;
* with ``peak=True``, the peak memory of one step in a fresh process and, with ``mem_cap``, the largest batch
  whose fresh-process peak fits (:func:`~leanprop.accounting.memory.peak_memory`,
  :func:`~leanprop.accounting.memory.max_batch`). A fresh process must rebuild the model, so this needs a
  factory: ``"package.module:factory"``, ``"path/to/file.py:factory"`` or a function/class importable under its
  module and name. For a model object (or a factory defined in ``__main__`` or inside a function) the peak and
  max batch are skipped, with one printed line saying why. The probe trains on cross-entropy against random
  targets, so it also needs one float input tensor and ``(batch, classes)`` logits.

Prints a table (progress on stderr) and returns one JSON-serialisable dict per method.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["profile", "DEFAULT_METHODS", "format_profile"]

#: the methods :func:`profile` compares by default
DEFAULT_METHODS = ("dense", "checkpoint", "blpa4", "blpa2", "swat-u90-packed", "swat-u90+blpa4")


class _Loss:
    """The loss of every method: ``loss_fn(output)`` when given; else cross-entropy against fixed random targets
    when the output is ``(batch, classes)`` logits, and ``output.float().sum()`` otherwise."""

    def __init__(self, loss_fn: Callable[[Any], torch.Tensor] | None, seed: int = 1):
        self.loss_fn = loss_fn
        self.seed = seed
        self.targets: torch.Tensor | None = None

    @staticmethod
    def first(output: Any) -> Any:
        return output[0] if isinstance(output, (tuple, list)) else output

    def is_cross_entropy(self, output: Any) -> bool:
        out = self.first(output)
        return (self.loss_fn is None and isinstance(out, torch.Tensor) and out.dim() == 2
                and out.is_floating_point() and out.shape[1] > 1)

    def target(self, out: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            g = torch.Generator().manual_seed(self.seed)
            self.targets = torch.randint(0, out.shape[1], (out.shape[0],), generator=g).to(out.device)
        return self.targets

    def __call__(self, output: Any) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(output)
        out = self.first(output)
        if self.is_cross_entropy(output):
            return torch.nn.functional.cross_entropy(out.float(), self.target(out))
        return out.float().sum()


def _importable_ref(fn: Any) -> tuple[str | None, str | None, str]:
    """``(reference, sys.path entry the child needs or None, why not)`` of a factory callable."""
    from leanprop.accounting.memory import resolve_factory

    module_name = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not module_name or not qual:
        return None, None, f"{fn!r} has no module and name to import it by"
    if module_name == "__main__":
        return None, None, (f"{qual} is defined in the running script (__main__), which a fresh process cannot "
                            "import without running the script again; move it to a module or pass "
                            "'path/to/file.py:factory'")
    if "<locals>" in qual or "<lambda>" in qual:
        return None, None, f"{qual} is defined inside a function; define it at module level"
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if module is None or not file:
        return None, None, f"module {module_name} has no file"
    if module_name.startswith("_leanprop_user_model_"):  # loaded from 'path/to/file.py:factory'
        ref, root = f"{file}:{qual}", None
    else:
        ref = f"{module_name}:{qual}"
        depth = len(module_name.split(".")) - (0 if os.path.basename(file) == "__init__.py" else 1)
        root = os.path.dirname(os.path.abspath(file))
        for _ in range(depth):
            root = os.path.dirname(root)
    try:
        found = resolve_factory(ref)[1]
    except (ImportError, ValueError) as e:
        return None, None, str(e)
    if found is not fn:
        return None, None, f"{ref} does not name this factory"
    return ref, root, ""


@contextlib.contextmanager
def _python_path(entry: str | None) -> Iterator[None]:
    """``PYTHONPATH`` with ``entry`` first for the fresh-process probes started in the block."""
    old = os.environ.get("PYTHONPATH")
    if entry:
        os.environ["PYTHONPATH"] = entry + (os.pathsep + old if old else "")
    try:
        yield
    finally:
        if entry:
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old


def _args(example_inputs: Any) -> tuple[Any, ...]:
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not args or not isinstance(args[0], torch.Tensor):
        raise TypeError("profile: example_inputs must be a tensor or a tuple/list of positional inputs, the first "
                        "one a tensor with the batch first")
    return args


def _methods(methods: str | Sequence[str]) -> list[str]:
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    out = ["dense"]
    for m in items:
        m = str(m).strip().lower()
        if m and m not in out:
            out.append(m)
    return out


def _build(model: Any, args: tuple[Any, ...]) -> tuple[nn.Module, str, dict[str, Any] | None, str | None, str]:
    """``(model, name, base spec or None, sys.path entry, why no fresh-process probe)``."""
    from leanprop.accounting.memory import _call_factory, build_model, is_factory_ref, normalize_spec, resolve_factory

    x = args[0]
    if isinstance(model, nn.Module):
        return model, type(model).__name__, None, None, (
            "the model is an object, which a fresh process cannot rebuild; pass its factory "
            "('package.module:factory', 'path/to/file.py:factory' or an importable function/class)")
    if isinstance(model, str) and not is_factory_ref(model):  # a registry name (`leanprop models`)
        spec = normalize_spec({"model": model, "input_shape": list(x.shape[1:]), "device": str(x.device)})
        built, _ = build_model(spec)
        spec.pop("method")
        return built, spec["model"], spec, None, ""
    if isinstance(model, str):
        ref, factory = resolve_factory(model)
        root, why = None, ""
    elif callable(model):
        factory = model
        ref, root, why = _importable_ref(model)
    else:
        raise TypeError(f"profile: model must be a torch.nn.Module, a factory callable or 'package.module:factory', "
                        f"got {type(model).__name__}")
    name = ref or getattr(factory, "__qualname__", type(factory).__name__)
    if ref is not None and (len(args) != 1 or not x.is_floating_point() or x.dim() < 2):
        ref, why = None, ("the fresh-process probe feeds one float tensor (batch first) and trains on "
                          "cross-entropy; these example inputs are not that")
    if ref is not None:
        try:  # the factory's classes: its num_classes default, or read off its output (logits needed)
            spec = normalize_spec({"model": ref, "input_shape": list(x.shape[1:]), "device": str(x.device)})
        except ValueError as e:
            ref, why = None, str(e)
    if ref is None:
        torch.manual_seed(0)
        built = _call_factory(name, factory, {}, None, int(x.shape[1]) if x.dim() >= 2 else 3).to(x.device)
        return built, name, None, None, why
    built, _ = build_model(spec)
    spec.pop("method")
    return built, ref, spec, root, ""


def _step(model: nn.Module, controller: Any, optimizer: Any, args: tuple[Any, ...], loss: _Loss,
          output: Any) -> Callable[[], Any]:
    """One training step: :func:`leanprop.timing.training_step` for the cross-entropy default, the same sequence
    with the given loss otherwise."""
    from leanprop.timing import training_step

    if len(args) == 1 and loss.is_cross_entropy(output):
        return training_step(model, controller, optimizer, args[0], loss.target(loss.first(output)))

    def step() -> Any:
        value = loss(model(*args))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        controller.step()
        return value

    return step


def _error(e: BaseException) -> str:
    return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"


def profile(model: Any, example_inputs: Any, methods: str | Sequence[str] = DEFAULT_METHODS, *,
            loss_fn: Callable[[Any], torch.Tensor] | None = None, mem_cap: int | str | None = None,
            rounds: int = 3, warmup: int = 1, peak: bool = True, progress: bool = True,
            timer: Callable[[], float] | None = None) -> list[dict[str, Any]]:
    """Measure every method of ``methods`` on ``model`` and ``example_inputs``; print a table and return one
    JSON-serialisable record per method (``dense`` first: it is always measured, as the baseline).

    ``model``: a ``torch.nn.Module`` (deep-copied for each method, never modified), or a factory --
    ``"package.module:factory"``, ``"path/to/file.py:factory"`` or a callable -- called once (seeded, with
    ``num_classes`` and ``in_channels`` where its signature names them) and needed for the fresh-process peak
    and max batch; a registry name (``"resnet20"``, see ``leanprop models``) works too. ``example_inputs``: a
    tensor or a tuple of positional inputs, batch first. ``loss_fn(output)``:
    the scalar to back-propagate (default: cross-entropy against fixed random targets for ``(batch, classes)``
    logits, else ``output.float().sum()``); the fresh-process probes always train on cross-entropy.
    ``mem_cap``: bytes or a size string (``"4GiB"``) for the largest-batch search. ``rounds``/``warmup``: timed
    and untimed steps per method (at least one untimed step always runs: it also catches a method whose step
    fails). ``peak``: measure the fresh-process peak (and max batch). ``progress``: a progress bar on stderr.
    ``timer``: the clock of the step times (tests inject a fake one). The fresh-process probes inherit this
    process's glibc malloc settings (:func:`leanprop.allocator.set_mmap_threshold`, ``GLIBC_TUNABLES``).

    Record keys: ``method``, ``model``, ``batch``, ``input_shape``, ``device``; ``saved_bytes``,
    ``saved_raw_bytes``, ``saved_by_kind``, ``saved_by_origin``, ``saved_via``, ``ratio_vs_dense``; ``step_s``
    (median), ``step_s_all``, ``dense_step_s``, ``time_vs_dense``; with the probe ``peak_bytes``,
    ``step_peak_growth_bytes``, ``peak_growth_ratio_vs_dense``, ``peak`` (the probe's dict) and, with ``mem_cap``,
    ``mem_cap_bytes``, ``max_batch``, ``max_batch_hit_limit``; ``peak_skipped`` (why, when skipped); ``error``
    (why a method has no numbers).
    """
    from tqdm import tqdm

    from leanprop.accounting.memory import max_batch, parse_size, peak_memory, saved_bytes
    from leanprop.methods import parse_method
    from leanprop.nn.convert import convert_
    from leanprop.timing import device_sync, interleaved

    if rounds < 1 or warmup < 0:
        raise ValueError(f"profile: rounds must be >= 1 and warmup >= 0 (got rounds={rounds}, warmup={warmup})")
    cap = parse_size(mem_cap) if mem_cap is not None else None
    timer = timer or time.perf_counter
    args = _args(example_inputs)
    names = _methods(methods)
    base, model_name, spec, root, why = _build(model, args)
    loss = _Loss(loss_fn)
    x = args[0]
    batch = int(x.shape[0]) if x.dim() else 1
    device = str(x.device)
    if peak and spec is None:
        print(f"profile: peak and max batch skipped: {why}")
    probe = peak and spec is not None
    bar = tqdm(total=len(names) * (2 + probe), desc="leanprop.profile", unit="step", disable=not progress,
               file=sys.stderr, leave=False)

    def note(what: str, done: int = 0) -> None:
        bar.set_postfix_str(what)
        bar.update(done)

    records: dict[str, dict[str, Any]] = {}
    steps: dict[str, Callable[[], Any]] = {}
    output = None
    for m in names:
        rec: dict[str, Any] = {"method": m, "model": model_name, "batch": batch,
                               "input_shape": [list(a.shape) for a in args if isinstance(a, torch.Tensor)],
                               "device": device}
        records[m] = rec
        note(f"{m}: convert and audit")
        try:
            configs = parse_method(m)
        except ValueError as e:
            rec["error"] = str(e)
            bar.update(2 + probe)
            continue
        try:
            net = copy.deepcopy(base)
            controller = convert_(net, configs)
        except Exception as e:  # noqa: BLE001 -- a method that cannot convert the model is a row, not a crash
            rec["error"] = f"cannot convert: {_error(e)}"
            bar.update(2 + probe)
            continue
        try:
            rep = saved_bytes(net, args, loss, model_name=model_name)
            rec.update(saved_bytes=rep.total_bytes, saved_raw_bytes=rep.raw_bytes, saved_tensors=rep.num_saved,
                       saved_by_kind=rep.by_kind, saved_by_origin=rep.by_origin, saved_via=rep.via,
                       saved_codec=rep.codec, parameter_bytes=rep.parameter_bytes)
            bar.update(1)
            net.train()
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            controller.attach_optimizer(opt)
            if controller.needs_prepare and len(args) == 1:
                note(f"{m}: prepare")
                controller.prepare(x, progress=lambda s, m=m: note(f"{m}: prepare: {s}"))
            if output is None:  # what the model returns decides the loss (the same for every method)
                with torch.no_grad():
                    output = net(*args)
            step = _step(net, controller, opt, args, loss, output)
            note(f"{m}: first step")
            step()  # untimed: the first warm-up step, and a method whose step fails is a row
            steps[m] = step
            bar.update(1)
        except Exception as e:  # noqa: BLE001
            if m == "dense":
                raise
            rec["error"] = f"step failed: {_error(e)}"
            bar.update(2 + probe - ("saved_bytes" in rec))
    if probe:  # the probe trains on cross-entropy against spec["num_classes"] classes
        out = _Loss.first(output)
        if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == spec["num_classes"]):
            probe, why = False, (f"the fresh-process probe trains on cross-entropy and needs logits of shape (batch, "
                                 f"{spec['num_classes']}); the model returns {getattr(out, 'shape', type(out))}")
            print(f"profile: peak and max batch skipped: {why}")
            bar.total -= len(names)
    more = max(0, warmup - 1)  # the first step above was the first warm-up step
    bar.total += (more + rounds) * len(steps)
    bar.refresh()
    times = interleaved(steps, rounds=rounds, warmup=more, timer=timer, sync=device_sync(x.device),
                        progress=lambda s: note(s, 1))
    dense_s = statistics.median(times["dense"])
    for m, ts in times.items():
        med = statistics.median(ts)
        records[m].update(step_s=med, step_s_all=ts, dense_step_s=dense_s,
                          time_vs_dense=med / dense_s if dense_s > 0 else None, rounds=rounds, warmup=max(1, warmup))
    dense = records["dense"]
    for rec in records.values():
        if "saved_bytes" in rec and dense.get("saved_bytes"):
            rec["ratio_vs_dense"] = rec["saved_bytes"] / dense["saved_bytes"]
    if probe:
        with _python_path(root):
            for m in names:
                rec = records[m]
                if "error" in rec:
                    continue
                note(f"{m}: peak (fresh process)")
                p = peak_memory({**spec, "method": m}, batch)
                rec["peak"] = p
                bar.update(1)
                if not p.get("ok"):
                    rec["error"] = f"peak memory probe failed: {p.get('error')}"
                    continue
                rec["peak_bytes"] = p.get("peak_bytes")
                rec["step_peak_growth_bytes"] = p.get("step_peak_growth_bytes")
                if cap is not None:
                    note(f"{m}: max batch")
                    per_sample = max(rec["saved_bytes"] / max(batch, 1), 1.0)
                    res = max_batch({**spec, "method": m}, cap, start=max(1, int(cap / (2 * per_sample))),
                                    on_probe=lambda r, m=m: note(f"{m}: max batch {r['batch']} "
                                                                 f"{'fits' if r['fits'] else 'too big'}"))
                    rec.update(mem_cap_bytes=cap, max_batch=res.batch, max_batch_fails=res.fails,
                               max_batch_hit_limit=res.hit_limit)
        for rec in records.values():
            if rec.get("step_peak_growth_bytes") and dense.get("step_peak_growth_bytes"):
                rec["peak_growth_ratio_vs_dense"] = rec["step_peak_growth_bytes"] / dense["step_peak_growth_bytes"]
    elif peak:
        for rec in records.values():
            rec["peak_skipped"] = why
    bar.close()
    out = [records[m] for m in names]
    print(format_profile(out))
    return out


def format_profile(records: list[dict[str, Any]]) -> str:
    """The table :func:`profile` prints: one row per method, then the kept bytes by kind and by saving layer
    (``peak_skipped`` is printed once, before the measurements, not here)."""
    from leanprop.accounting.memory import format_bytes

    def ratio(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    r0 = records[0] if records else {}
    cuda = str(r0.get("device", "")).startswith("cuda")
    w = max([12, *(len(str(r["method"])) for r in records)])
    lines = [f"{r0.get('model', '?')}, batch {r0.get('batch', '?')}, {r0.get('device', '?')}",
             f"{'method':<{w}} {'kept':>11} {'x dense':>8} {'step ms':>9} {'x dense':>8} "
             f"{'peak alloc' if cuda else 'peak RSS':>11} {'growth x':>9} {'max batch':>10}"]
    for r in records:
        if "saved_bytes" not in r:
            lines.append(f"{r['method']:<{w}} error: {r.get('error')}")
            continue
        step = "-" if r.get("step_s") is None else f"{r['step_s'] * 1000:.1f}"
        mb = "-" if r.get("max_batch") is None else str(r["max_batch"]) + ("+" if r.get("max_batch_hit_limit") else "")
        lines.append(f"{r['method']:<{w}} {format_bytes(r['saved_bytes']):>11} {ratio(r.get('ratio_vs_dense')):>8} "
                     f"{step:>9} {ratio(r.get('time_vs_dense')):>8} {format_bytes(r.get('peak_bytes')):>11} "
                     f"{ratio(r.get('peak_growth_ratio_vs_dense')):>9} {mb:>10}")
    for r in records:
        if "saved_by_kind" not in r:
            continue
        kinds = ", ".join(f"{k} {format_bytes(v)}" for k, v in r["saved_by_kind"].items() if k != "parameter")
        total = r["saved_bytes"] or 1
        layers = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in list(r["saved_by_origin"].items())[:3])
        lines.append(f"  {r['method']}: {kinds or 'nothing kept'}" + (f"; by layer: {layers}" if layers else ""))
    for r in records:
        if r.get("error") and "saved_bytes" in r:
            lines.append(f"  {r['method']}: error: {r['error']}")
    return "\n".join(lines)
