"""Small utilities every package uses: atomic writes, the cache dir and an inter-process file lock, the
environment record a result depends on, and JSONL appends for benchmark records.

Everything written here goes through a temporary name in the same folder and ``os.replace``, so an interrupted
run never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from leanprop import allocator

try:  # POSIX only; elsewhere concurrent builders simply both do the work
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "append_jsonl", "cache_dir",
           "user_cache_base", "file_lock", "environment", "git_sha", "run_context", "set_submodule", "swap_class",
           "reexec_under_jemalloc", "run_reporting_errors", "JEMALLOC_PATHS"]


# ------------------------------------------------------------------------------------------------ atomic writes
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and ``os.replace`` (fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Append records (one JSON object per line, sorted keys) to ``path`` atomically (rewrite + rename)."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


# ------------------------------------------------------------------------------------------------ cache and lock
def user_cache_base() -> Path:
    """``$XDG_CACHE_HOME``, else ``~/.cache``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg).expanduser() if xdg else Path.home() / ".cache"


def cache_dir() -> Path:
    """Where leanprop caches decoded arrays and compiled kernels: ``$LEANPROP_CACHE``, else
    ``$XDG_CACHE_HOME/leanprop`` (``~/.cache/leanprop``). Safe to delete at any time; rebuilt on demand."""
    env = os.environ.get("LEANPROP_CACHE")
    return Path(env).expanduser() if env else user_cache_base() / "leanprop"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (created if needed). A no-op where locking is impossible."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+b")  # noqa: SIM115 - closed below
    except OSError:
        yield
        return
    try:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


# ------------------------------------------------------------------------------------------------ environment
def git_sha(cwd: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd or Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device, world_size: int = 1) -> dict:
    """What a result depends on: versions, threads, allocator, machine."""
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "world_size": world_size,
        "allocator": allocator.describe(),
        "git_sha": git_sha(),
        "argv": sys.argv,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_context(device: str = "cpu") -> tuple[dict, str]:
    """``(environment, timestamp)`` of a benchmark record: versions, threads, allocator, machine and git sha (no
    argv), and the current UTC time in ISO format (seconds)."""
    import datetime as dt

    env = {k: v for k, v in environment(torch.device(device)).items() if k != "argv"}
    return env, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------ modules
def swap_class(module: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A shallow copy of ``module`` as class ``cls``: the same Parameters, buffers, hooks and attributes."""
    new = copy.copy(module)
    new.__class__ = cls
    return new


def set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model`` (the way in-place conversions swap layers)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ------------------------------------------------------------------------------------------------ processes
#: where jemalloc is looked for (``leanprop train`` / ``bench`` restart under it when present)
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")


def _jemalloc_path() -> str | None:
    return next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)


def reexec_under_jemalloc(cmd: list[str]) -> None:
    """Replace this process by ``cmd`` with jemalloc preloaded -- only on Linux, when libjemalloc.so.2 is
    installed, ``LEANPROP_ALLOCATOR`` is unset or ``auto`` (``system`` turns it off) and jemalloc is not
    preloaded already; otherwise return and let the caller go on. Benchmark scripts call it first so that
    their timings use the allocator ``leanprop bench`` uses."""
    if not sys.platform.startswith("linux"):
        return
    if os.environ.get("LEANPROP_ALLOCATOR", "auto") != "auto" or "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = _jemalloc_path()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = (lib + " " + env.get("LD_PRELOAD", "")).strip()
    env.setdefault("MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1")
    env["LEANPROP_ALLOCATOR"] = "jemalloc"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)


def run_reporting_errors(what: str, fn: Any, args: Any) -> int:
    """``fn(args)``; a configuration or input error (``ConfigError`` is a ``ValueError``; missing files, NaN
    losses, missing optional modules) becomes one ``WHAT: error: ...`` line on stderr and exit status 2
    (``LEANPROP_DEBUG=1`` raises it instead)."""
    try:
        return fn(args)
    except (ValueError, FileNotFoundError, FloatingPointError, ImportError) as e:
        if os.environ.get("LEANPROP_DEBUG"):
            raise
        print(f"{what}: error: {e}", file=sys.stderr)
        return 2
