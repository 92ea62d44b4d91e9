"""Where data and decoded-array caches live, and crash-safe helpers for writing them.

Everything written here goes through a temporary name and ``os.replace``, so an interrupted run never
leaves a half-written cache behind, and concurrent processes (DDP ranks, parallel runs) that build the
same cache serialise on a lock file instead of decoding the same images twice.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from leanprop.utils import user_cache_base


def resolve_data_root(cfg_root: str | os.PathLike | None) -> Path:
    """The data directory: ``cfg_root`` (``data.root`` / ``--data-dir``) if given, else ``$LEANPROP_DATA``,
    else ``$XDG_CACHE_HOME/leanprop/data`` (``~/.cache/leanprop/data``)."""
    if cfg_root:
        return Path(cfg_root).expanduser()
    env = os.environ.get("LEANPROP_DATA")
    if env:
        return Path(env).expanduser()
    return user_cache_base() / "leanprop" / "data"


_ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")


def load_array_cache(folder: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """Arrays and metadata from a cache folder written by :func:`save_array_cache`, or None if absent."""
    meta_file = folder / "meta.json"
    if not meta_file.is_file():  # meta.json is written last: its presence marks a complete cache
        return None
    try:
        meta = json.loads(meta_file.read_text())
        arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in _ARRAY_NAMES}
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring unreadable data cache {folder}: {e}", stacklevel=2)
        return None
    return arrays, meta


def save_array_cache(folder: Path, arrays: dict[str, np.ndarray], meta: dict) -> bool:
    """Write ``x_train, y_train, x_test, y_test`` as ``.npy`` plus ``meta.json`` into ``folder`` atomically.

    The files go to a temporary sibling folder that is renamed into place at the end. Returns False (with
    a warning) when the cache location is not writable; the caller then just keeps the arrays in memory.
    """
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as e:
        warnings.warn(f"cannot write the data cache under {folder.parent} ({e}); set LEANPROP_CACHE to a "
                      "writable folder to avoid decoding again next time", stacklevel=2)
        return False
    try:
        for name in _ARRAY_NAMES:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arrays[name]), allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if folder.exists():  # a stale or concurrently written copy: replace it
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return True
    except OSError as e:
        warnings.warn(f"could not write the data cache {folder}: {e}", stacklevel=2)
        return False
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
