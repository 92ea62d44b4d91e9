"""Atomic checkpoints that hold everything needed for a bit-identical resume."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "leanprop-checkpoint"
VERSION = 1


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _cpu_bytes(t: Any) -> torch.Tensor:
    """An RNG state as the contiguous CPU ``torch.ByteTensor`` that ``torch.set_rng_state`` needs, whatever device
    or dtype ``torch.load(map_location=...)`` gave it (the byte values themselves are never changed)."""
    t = torch.as_tensor(t).detach()
    if t.dtype != torch.uint8 and (t.numel() and (int(t.min()) < 0 or int(t.max()) > 255)):
        raise ValueError(f"RNG state holds values outside 0..255 (dtype {t.dtype}); the checkpoint is corrupt")
    return t.to(device="cpu", dtype=torch.uint8).contiguous()


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s output. The tensors may sit on any device (a checkpoint loaded with
    ``map_location="cuda"``): they are brought back to the CPU first, so resuming on a GPU works."""
    torch.set_rng_state(_cpu_bytes(state["torch"]))
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    keys = torch.as_tensor(n["keys"]).detach().cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached"])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_cpu_bytes(s) for s in state["cuda"]])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a leanprop checkpoint; a missing, corrupt or foreign file raises an error that says what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise ValueError(
            f"Checkpoint {path} is corrupt or not a leanprop checkpoint ({type(e).__name__}: {e}). "
            "Delete it and resume from an earlier one, or start a new run."
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a leanprop checkpoint (no '{FORMAT}' marker). A plain state_dict can be "
            "evaluated with `leanprop eval --weights FILE --model NAME`."
        )
    if ckpt.get("version", 0) > VERSION:
        raise ValueError(f"{path} was written by a newer leanprop (format {ckpt['version']}); upgrade leanprop.")
    return ckpt
