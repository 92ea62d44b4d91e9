"""What every benchmark record carries (shared by ``benchmarks/*.py`` and ``leanprop bench``): the machine and
software context, a timestamp, and an append that never leaves a JSONL file half-written."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["run_context", "append_jsonl"]


def run_context(device: str = "cpu") -> tuple[dict, str]:
    """``(environment, timestamp)``: versions, threads, allocator, machine and git sha (no argv), and the
    current UTC time in ISO format (seconds)."""
    import datetime as dt

    import torch

    from leanprop.train.run_log import environment

    env = {k: v for k, v in environment(torch.device(device)).items() if k != "argv"}
    return env, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def append_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Append records (one JSON object per line, sorted keys) to ``path`` atomically (rewrite + rename)."""
    from leanprop.train.checkpoint import atomic_write_text

    path = Path(path)
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
