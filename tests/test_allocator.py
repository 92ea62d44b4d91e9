"""The glibc mmap-threshold setting: validation, description, effect in a fresh process, CLI and config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from leanprop import allocator
from leanprop.accounting.memory import peak_memory
from leanprop.cli import main
from leanprop.config import ConfigError, load


def test_describe_names_the_allocator(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(allocator.MMAP_THRESHOLD_ENV, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert allocator.describe() == "system" and allocator.mmap_threshold() is None
    monkeypatch.setenv(allocator.MMAP_THRESHOLD_ENV, "262144")
    assert allocator.describe() == "system, mmap threshold 256 KiB" and allocator.mmap_threshold() == 262144
    monkeypatch.setenv(allocator.MMAP_THRESHOLD_ENV, "1000")
    assert allocator.describe() == "system, mmap threshold 1000 B"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    assert allocator.describe() == "system, mmap threshold 1000 B, huge pages"
    monkeypatch.delenv(allocator.MMAP_THRESHOLD_ENV)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=524288:glibc.malloc.hugetlb=2")
    assert allocator.describe() == "system, mmap threshold 512 KiB, huge pages (hugetlb=2)"
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert allocator.describe() == "jemalloc"


@pytest.mark.parametrize("bad", [-1, 33 * 2**20, True, 1.5])
def test_threshold_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="32 MiB"):
        allocator.check_mmap_threshold(bad)


def test_threshold_with_jemalloc_preloaded_names_the_fix(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    with pytest.raises(ValueError, match="LEANPROP_ALLOCATOR=system"):
        allocator.set_mmap_threshold(262144)


_MMAPPED_CHILD = """
import ctypes, json, sys
from leanprop import allocator
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
if sys.argv[1] == "set":
    allocator.set_mmap_threshold(64 * 1024)
libc.free(ctypes.c_void_p(libc.malloc(4 << 20)))  # a freed 4 MiB mapping: glibc's dynamic threshold rises to it
before = libc.mallinfo2().hblks
blocks = [libc.malloc(2 << 20) for _ in range(40)]
print(json.dumps({"mmapped": libc.mallinfo2().hblks - before, "allocator": allocator.describe()}))
for p in blocks:
    libc.free(ctypes.c_void_p(p))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc is Linux-only")
def test_set_threshold_maps_smaller_blocks_in_a_fresh_process():
    """After a 4 MiB block is freed, glibc's default threshold has risen to 4 MiB and 2 MiB blocks come from the
    heap; with the threshold fixed at 64 KiB they get their own mappings (and leave at their free) once the free
    space the heap already holds is used."""
    def child(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", _MMAPPED_CHILD, mode], capture_output=True, text=True,
                             env={k: v for k, v in __import__("os").environ.items()
                                  if k not in (allocator.MMAP_THRESHOLD_ENV, "LD_PRELOAD", "GLIBC_TUNABLES")})
        if "mallinfo2" in out.stderr:
            pytest.skip("this C library has no mallinfo2 (glibc < 2.33)")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    default, fixed = child("default"), child("set")
    assert default["allocator"] == "system" and fixed["allocator"] == "system, mmap threshold 64 KiB"
    assert default["mmapped"] <= 5 and fixed["mmapped"] >= 30, (default, fixed)


def test_fresh_process_probe_inherits_and_records_the_threshold(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv(allocator.MMAP_THRESHOLD_ENV, "262144")
    r = peak_memory({"model": "preact_resnet20", "input_shape": [3, 16, 16], "threads": 1}, 2, timeout=120)
    assert r["ok"], r
    assert r["allocator"] == "system, mmap threshold 256 KiB"


@pytest.fixture
def threshold_calls(monkeypatch) -> list[int]:
    """``set_mmap_threshold`` replaced by a fake that only records its calls and sets the environment variable
    (this test process keeps its allocator); glibc malloc, no preloaded allocator."""
    calls: list[int] = []

    def fake_set(n: int) -> None:
        calls.append(n)
        monkeypatch.setenv(allocator.MMAP_THRESHOLD_ENV, str(n))

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(allocator, "set_mmap_threshold", fake_set)
    return calls


def test_bench_memory_sets_the_threshold_and_records_it(threshold_calls, tmp_path, capsys):
    calls = threshold_calls
    out = tmp_path / "mem.jsonl"
    argv = ["bench", "memory", "--model", "resnet20", "--batch", "2", "--input-size", "16", "--method", "dense",
            "--no-peak", "--threads", "1", "--malloc-mmap-threshold", "256KiB", "--jsonl", str(out),
            "--progress", "off"]
    assert main(argv) == 0
    assert calls == [262144]
    assert "allocator system, mmap threshold 256 KiB" in capsys.readouterr().out
    assert json.loads(out.read_text().splitlines()[0])["allocator"] == "system, mmap threshold 256 KiB"
    assert main([*argv[:-4], "--malloc-mmap-threshold", "64MiB"]) == 2
    assert "32 MiB" in capsys.readouterr().err


def test_config_validates_the_threshold():
    assert load(None, ["malloc_mmap_threshold=256KiB"]).malloc_mmap_threshold == "256KiB"
    with pytest.raises(ConfigError, match="malloc_mmap_threshold: .*32 MiB"):
        load(None, ["malloc_mmap_threshold=64MiB"])
    with pytest.raises(ConfigError, match="bad size"):
        load(None, ["malloc_mmap_threshold=lots"])


def test_trainer_applies_the_threshold_and_records_it(threshold_calls, tmp_path):
    import json as _json

    from leanprop.train.trainer import Trainer
    from tests._helpers import synth_overrides

    calls = threshold_calls
    cfg = load(None, synth_overrides(tmp_path, "train.epochs=1", "data.synthetic_train=16", "data.synthetic_test=16",
                                     "model.name=resnet8", "malloc_mmap_threshold=256KiB"))
    t = Trainer(cfg, progress=False)
    assert calls == [262144]
    t.fit()
    env = _json.loads((t.run_dir / "env.json").read_text())
    assert env["allocator"] == "system, mmap threshold 256 KiB"
