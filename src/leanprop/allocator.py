"""The C allocator setting that decides how much freed activation memory stays resident.

glibc's ``malloc`` serves a request of at least the *mmap threshold* with its own ``mmap`` and returns it to the
system at ``free``; smaller requests come from heaps whose freed space stays resident. The threshold starts at
128 KiB and *rises* to the size of each mmapped block that is freed, up to 32 MiB (glibc manual, "Memory
Allocation Tunables", ``glibc.malloc.mmap_threshold``). A training step frees blocks of many sizes, so after a
few of them every activation below 32 MiB comes from a heap, and memory freed in the middle of the step stays in
the resident set: the peak a memory cap sees is then above the bytes in use at any one time. Methods that free
activations early (BLPA, checkpointing) lose most to it (measured: docs/methods/blpa.md, "Peak memory").

Setting the threshold fixes it and turns the dynamic rise off: every block of at least ``nbytes`` is then mapped
and unmapped with its tensor. The cost is a page fault per fresh page of every such block.
:func:`set_mmap_threshold` sets it in this process (``mallopt``) and in the environment, so child processes
(data-loader workers, fresh-process memory probes) start with it; ``MALLOC_MMAP_THRESHOLD_=262144`` set before
Python starts does the same without code. jemalloc, when preloaded, has its own policy and ignores it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_THRESHOLD_ENV", "MMAP_THRESHOLD_MAX", "check_mmap_threshold", "describe", "mmap_threshold",
           "set_mmap_threshold"]

#: the environment variable glibc reads at start-up (it also turns the dynamic threshold off)
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
#: the largest threshold glibc accepts on 64-bit systems (``HEAP_MAX_SIZE / 2``)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def _jemalloc_preloaded() -> bool:
    return "jemalloc" in os.environ.get("LD_PRELOAD", "")


def _tunables() -> dict[str, str]:
    """``GLIBC_TUNABLES`` (``glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=262144``) as a dict."""
    pairs = (item.split("=", 1) for item in os.environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item)
    return {k.strip(): v.strip() for k, v in pairs}


def mmap_threshold() -> int | None:
    """The fixed mmap threshold this process was given through :data:`MMAP_THRESHOLD_ENV` (or the
    ``glibc.malloc.mmap_threshold`` tunable), None if none (or when the value is not a whole number of bytes,
    which glibc ignores too)."""
    text = os.environ.get(MMAP_THRESHOLD_ENV, "").strip() or _tunables().get("glibc.malloc.mmap_threshold", "")
    return int(text) if text.isdigit() else None


def describe() -> str:
    """The allocator a record ran under: ``jemalloc``, ``system``, or ``system`` with its settings, e.g.
    ``system, mmap threshold 256 KiB, huge pages`` (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: glibc asks the
    kernel for transparent huge pages on the memory it maps, so a fresh block faults in 2 MiB at a time instead
    of 4 KiB; glibc manual, "Memory Allocation Tunables")."""
    if _jemalloc_preloaded():
        return "jemalloc"
    parts = ["system"]
    n = mmap_threshold()
    if n is not None:
        parts.append(f"mmap threshold {n // 1024} KiB" if n % 1024 == 0 else f"mmap threshold {n} B")
    huge = _tunables().get("glibc.malloc.hugetlb", "0")
    if huge not in ("", "0"):
        parts.append("huge pages" if huge == "1" else f"huge pages (hugetlb={huge})")
    return ", ".join(parts)


def check_mmap_threshold(nbytes: int) -> int:
    """``nbytes`` as an int, or ``ValueError`` naming the accepted range (glibc ignores values above 32 MiB)."""
    if isinstance(nbytes, bool) or int(nbytes) != nbytes or not 0 <= int(nbytes) <= MMAP_THRESHOLD_MAX:
        raise ValueError(f"malloc mmap threshold must be 0..{MMAP_THRESHOLD_MAX} bytes (32 MiB), got {nbytes!r}; "
                         "e.g. 256KiB")
    return int(nbytes)


def set_mmap_threshold(nbytes: int) -> None:
    """Fix glibc's mmap threshold at ``nbytes`` in this process and its future children (see the module text).

    Raises ``ValueError`` for a value glibc would ignore, or where it cannot apply: another allocator
    (jemalloc) preloaded, or a C library without ``mallopt`` (not glibc).
    """
    nbytes = check_mmap_threshold(nbytes)
    if _jemalloc_preloaded():
        raise ValueError("the malloc mmap threshold is a glibc setting, but jemalloc is preloaded (LD_PRELOAD); "
                         "run with LEANPROP_ALLOCATOR=system to use glibc malloc, or leave the threshold unset")
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None or mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(nbytes)) != 1:
        raise ValueError("cannot set the malloc mmap threshold here: it needs Linux with glibc (mallopt); "
                         "leave the setting unset on this platform")
    os.environ[MMAP_THRESHOLD_ENV] = str(nbytes)
