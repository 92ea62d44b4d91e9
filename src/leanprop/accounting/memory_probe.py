"""Child process of :func:`leanprop.accounting.memory.peak_memory`: one training step, then its peak memory.

    python -m leanprop.accounting.memory_probe '{"model": "preact_resnet20", "batch": 8, "method": "dense"}'

Builds the model for the spec's method and runs one warm-up step on a batch of 2 (lazy imports, kernel and
thread-pool set-up happen once per process and are not the step's memory; ``"warmup": false`` skips it).
Then it makes a random batch and measures exactly one forward (cross-entropy loss) + backward, no optimizer.
Prints one line ``LEANPROP_PROBE_RESULT {json}`` on stdout.  Exit status 0 on success, 3 when the step went
above ``abort_above_bytes`` or ran out of memory, 2 on a bad spec.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
from typing import Any

from leanprop.accounting.memory import PROBE_MARKER

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _emit(result: dict[str, Any]) -> None:
    sys.stdout.write(PROBE_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def current_rss() -> int | None:
    """Resident set size now (``/proc/self/statm``), None where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def peak_rss() -> int | None:
    """``VmHWM`` (peak resident set size since start or the last reset) in bytes, None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ru_maxrss() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in bytes (Linux reports KiB, macOS bytes)."""
    import resource

    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v if sys.platform == "darwin" else v * 1024


def _watchdog(limit: int, stop: threading.Event, base: dict[str, Any]) -> None:
    """Exit the process (status 3) as soon as the RSS exceeds ``limit``: the step does not fit the cap."""
    while not stop.wait(0.002):
        rss = current_rss()
        if rss is not None and rss > limit:
            _emit({**base, "ok": False, "over_limit": True, "peak_bytes": rss,
                   "error": f"resident set above the cap ({rss} > {limit} bytes)"})
            os._exit(3)


def run(payload: dict[str, Any]) -> tuple[dict[str, Any], int]:
    import torch
    import torch.nn.functional as F

    from leanprop import allocator
    from leanprop.accounting.memory import build_model, make_batch, normalize_spec
    from leanprop.ops.autocast import autocast_context
    from leanprop.timing import time_calls

    batch = int(payload.pop("batch"))
    limit = payload.pop("abort_above_bytes", None)
    warmup = bool(payload.pop("warmup", True))
    spec = normalize_spec(payload)
    if spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    base = {"batch": batch, "method": spec["method"], "device": str(device), "model": spec["model"],
            "threads": torch.get_num_threads(), "dtype": spec["dtype"], "warmup_batch": 2 if warmup else 0,
            "allocator": allocator.describe()}
    stop = threading.Event()
    if limit and cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)
    elif limit and current_rss() is not None:
        threading.Thread(target=_watchdog, args=(int(limit), stop, base), daemon=True).start()

    model, _ = build_model(spec)
    if warmup:  # first-call costs (lazy imports, kernel/thread-pool set-up) are not the step's memory
        wx, wy = make_batch(spec, 2)
        with autocast_context(spec["device"], spec["dtype"]):
            F.cross_entropy(model(wx).float(), wy).backward()
        model.zero_grad(set_to_none=True)
        del wx, wy
    x, y = make_batch(spec, batch)
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        alloc_before = torch.cuda.memory_allocated(device)
    startup_peak = peak_rss()
    rss_before = current_rss()
    reset = reset_peak_rss() if not cuda else False
    losses = []

    def step() -> None:  # the measured step: forward, cross-entropy, backward
        with autocast_context(spec["device"], spec["dtype"]):
            losses.append(F.cross_entropy(model(x).float(), y))
        losses[-1].backward()

    try:
        seconds = time_calls(step, reps=1, sync=(lambda: torch.cuda.synchronize(device)) if cuda else None)[0]
    except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) or the CPU allocator giving up
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        stop.set()
        return {**base, "ok": False, "oom": True, "peak_bytes": None, "error": f"out of memory: {e}".split("\n")[0]}, 3
    loss = losses[0]
    stop.set()
    out = {**base, "ok": True, "seconds": seconds, "loss": float(loss.detach()), "ru_maxrss_bytes": ru_maxrss(),
           "rss_before_bytes": rss_before}
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        out.update(alloc_before_bytes=alloc_before, max_allocated_bytes=peak,
                   max_reserved_bytes=torch.cuda.max_memory_reserved(device),
                   step_peak_growth_bytes=peak - alloc_before, peak_bytes=peak)
    else:
        hwm = peak_rss()
        step_peak = hwm if (reset and hwm is not None) else out["ru_maxrss_bytes"]
        lifetime = max(v for v in (startup_peak, step_peak, hwm) if v is not None)
        out.update(step_peak_rss_bytes=step_peak, peak_reset=reset, startup_peak_rss_bytes=startup_peak,
                   step_peak_growth_bytes=None if rss_before is None else step_peak - rss_before,
                   peak_bytes=lifetime)
    return out, 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m leanprop.accounting.memory_probe '<json spec>'", file=sys.stderr)
        return 2
    try:
        payload = json.loads(argv[0])
        result, rc = run(payload)
    except (ValueError, KeyError, TypeError) as e:
        print(f"memory_probe: error: {e}", file=sys.stderr)
        return 2
    _emit(result)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
