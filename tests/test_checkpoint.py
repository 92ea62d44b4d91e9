import random

import numpy as np
import pytest
import torch

from leanprop.train import checkpoint as ck
from leanprop.utils import atomic_torch_save


def test_atomic_save_and_rng_roundtrip(tmp_path):
    state = {"format": ck.FORMAT, "version": ck.VERSION, "rng": ck.rng_state(), "x": torch.arange(3)}
    a = (torch.rand(3), random.random(), np.random.rand())
    path = tmp_path / "sub" / "c.pt"
    atomic_torch_save(state, path)
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temp file left behind
    loaded = ck.load_checkpoint(path)
    ck.set_rng_state(loaded["rng"])
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_corrupt_and_foreign_checkpoints(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt"):
        ck.load_checkpoint(bad)
    foreign = tmp_path / "sd.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a leanprop checkpoint"):
        ck.load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "missing.pt")


def test_failed_save_leaves_nothing(tmp_path):
    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"x": Boom()}, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("form", ["int64", "strided", "float64"])
def test_rng_state_restores_from_any_tensor_form(form):
    """torch.load(map_location=<gpu>) moves the saved CPU ByteTensor; set_rng_state brings any device, dtype or
    layout of the same byte values back to a CPU ByteTensor (a GPU resume used to raise "RNG state must be a
    torch.ByteTensor")."""
    state = ck.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())

    def change(t):
        if form == "strided":  # a non-contiguous view of the same values
            return torch.stack([t, t], 1)[:, 0]
        return t.to(getattr(torch, form))

    moved = {**state, "torch": change(state["torch"]),
             "numpy": {**state["numpy"], "keys": change(state["numpy"]["keys"])}}
    assert moved["torch"].dtype != torch.uint8 or not moved["torch"].is_contiguous()
    torch.manual_seed(99)
    np.random.seed(99)
    ck.set_rng_state(moved)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_rng_state_outside_byte_range_is_a_clear_error():
    state = ck.rng_state()
    with pytest.raises(ValueError, match="corrupt"):
        ck.set_rng_state({**state, "torch": state["torch"].to(torch.int64) + 300})
