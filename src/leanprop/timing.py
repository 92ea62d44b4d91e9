"""The one timing loop: every timed number of ``leanprop bench`` (the matrix, throughput, speed, kernel and
packing benchmarks) and of SWAT's kernel calibration is measured by :func:`time_calls`.

* :func:`time_calls` -- seconds of each of ``reps`` calls of a function (after ``warmup`` untimed calls);
* :func:`training_step` / :func:`time_step` -- one training step (forward, cross-entropy, ``zero_grad``,
  backward, ``optimizer.step()``, the method controller's ``step()``) and its time;
* :func:`interleaved` -- several functions timed round by round (each once per round), so that the noise of a
  shared machine hits them alike; ratios of their medians are then fair.

The clock is injectable (``timer``): tests pass a fake one and never depend on a measured time. On CUDA, pass
``sync`` (e.g. :func:`device_sync`) so that a call's time includes its queued kernels. This module imports only
torch and the standard library (it sits under everything that times).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Timer", "time_calls", "interleaved", "training_step", "time_step", "device_sync"]

#: a clock in seconds (``time.perf_counter`` unless a test injects one)
Timer = Callable[[], float]


def time_calls(fn: Callable[[], Any], *, reps: int, warmup: int = 0, timer: Timer = time.perf_counter,
               sync: Callable[[], None] | None = None) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``reps`` times timed; returns the seconds of each timed call.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the clock starts and before it stops, so that work
    queued on an accelerator counts in the call that queued it."""
    if reps < 0 or warmup < 0:
        raise ValueError(f"reps and warmup must be >= 0 (got reps={reps}, warmup={warmup})")
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    seconds = []
    for _ in range(reps):
        t0 = timer()
        fn()
        if sync is not None:
            sync()
        seconds.append(timer() - t0)
    return seconds


def interleaved(calls: Mapping[str, Callable[[], Any]], *, rounds: int, warmup: int = 0,
                timer: Timer = time.perf_counter, sync: Callable[[], None] | None = None,
                progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Time every function of ``calls`` once per round, in order, for ``warmup`` untimed then ``rounds`` timed
    rounds (each call through :func:`time_calls`); returns ``{name: [seconds of each timed round]}``.

    ``progress`` receives ``"step R/N NAME"`` before each call. To see the warm-up times too (e.g. a compiling
    first step), pass ``warmup=0`` and ``rounds=warmup + rounds`` and slice."""
    if rounds < 0 or warmup < 0:
        raise ValueError(f"rounds and warmup must be >= 0 (got rounds={rounds}, warmup={warmup})")
    times: dict[str, list[float]] = {name: [] for name in calls}
    total = warmup + rounds
    for r in range(total):
        for name, fn in calls.items():
            if progress is not None:
                progress(f"step {r + 1}/{total} {name}")
            if r < warmup:
                fn()
            else:
                times[name] += time_calls(fn, reps=1, timer=timer, sync=sync)
    return times


def training_step(model: Any, controller: Any, optimizer: Any, x: Any, y: Any, *,
                  autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> Callable[[], Any]:
    """A function doing one training step of ``model`` on ``(x, y)`` and returning its loss: the forward (inside
    ``autocast()`` when given, e.g. ``lambda: torch.autocast("cpu", torch.bfloat16)``), cross-entropy on the
    float32 logits, ``optimizer.zero_grad(set_to_none=True)``, backward, ``optimizer.step()``, then
    ``controller.step()`` (a :class:`leanprop.methods.Controller`; None: plain PyTorch training)."""
    import torch.nn.functional as F

    def step() -> Any:
        with autocast() if autocast is not None else contextlib.nullcontext():
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if controller is not None:
            controller.step()
        return loss

    return step


def device_sync(device: Any) -> Callable[[], None] | None:
    """The synchronisation a timed call on ``device`` needs: ``torch.cuda.synchronize`` on CUDA, else None."""
    import torch

    return torch.cuda.synchronize if torch.device(device).type == "cuda" else None


def time_step(model: Any, controller: Any, optimizer: Any, x: Any, y: Any, *,
              autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
              timer: Timer = time.perf_counter, sync: Callable[[], None] | None = None) -> float:
    """Seconds of one :func:`training_step` (synchronised on CUDA: ``sync`` defaults to :func:`device_sync` of
    ``x``'s device)."""
    if sync is None:
        sync = device_sync(x.device)
    step = training_step(model, controller, optimizer, x, y, autocast=autocast)
    return time_calls(step, reps=1, timer=timer, sync=sync)[0]
