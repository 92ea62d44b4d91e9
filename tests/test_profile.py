"""``leanprop.profile`` on a user's model, and ``leanprop bench memory|matrix --model package.module:factory``."""

from __future__ import annotations

import copy
import itertools
import json
import textwrap

import pytest
import torch
from torch import nn

import leanprop
from leanprop.accounting.memory import build_model, normalize_spec
from leanprop.cli import main

USER_MODEL = '''
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """No residual blocks: per-block checkpointing cannot convert it."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)
        self.in_channels = in_channels

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.body(x), 1).flatten(1))


def make_net(num_classes=10, in_channels=3):
    return Net(num_classes, in_channels)


def five_classes():
    return Net(num_classes=5)


def not_a_model():
    return 42


def features():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
'''


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(textwrap.dedent(USER_MODEL))
    return path


def fake_timer():
    """A clock that advances one second per reading: every timed step takes exactly 1 s."""
    ticks = itertools.count()
    return lambda: float(next(ticks))


def test_profile_records_from_a_file_factory(user_file, capsys):
    x = torch.randn(4, 3, 8, 8)
    records = leanprop.profile(f"{user_file}:make_net", x, rounds=2, peak=False, progress=False,
                               timer=fake_timer())
    json.dumps(records)  # JSON-serialisable
    by = {r["method"]: r for r in records}
    assert list(by) == ["dense", "checkpoint", "blpa4", "blpa2", "swat-u90-packed", "swat-u90+blpa4"]
    assert by["dense"]["model"] == f"{user_file.resolve()}:make_net"
    assert by["dense"]["ratio_vs_dense"] == 1.0 and by["dense"]["batch"] == 4
    assert by["blpa4"]["saved_bytes"] < by["dense"]["saved_bytes"]
    assert 0 < by["blpa4"]["ratio_vs_dense"] < 1 and by["blpa2"]["ratio_vs_dense"] < by["blpa4"]["ratio_vs_dense"]
    assert by["blpa4"]["saved_by_kind"].get("codes", 0) > 0 and by["blpa4"]["saved_by_origin"]
    for r in records:
        if r["method"] == "checkpoint":
            continue
        assert r["step_s_all"] == [1.0, 1.0] and r["step_s"] == 1.0 and r["dense_step_s"] == 1.0
        assert r["time_vs_dense"] == 1.0 and "error" not in r
    ck = by["checkpoint"]
    assert "no residual block" in ck["error"] and "saved_bytes" not in ck and "time_vs_dense" not in ck
    out = capsys.readouterr().out
    assert "checkpoint" in out and "error: cannot convert" in out and "no residual block" in out
    assert "blpa4" in out and "by layer" in out


def test_profile_leaves_the_model_alone_and_skips_peak_for_an_object(user_file, capsys):
    from leanprop.accounting.memory import resolve_factory

    model = resolve_factory(f"{user_file}:make_net")[1]()
    before = copy.deepcopy(model.state_dict())
    classes = [type(m) for m in model.modules()]
    records = leanprop.profile(model, torch.randn(4, 3, 8, 8), methods=("blpa4", "dense"), rounds=1, warmup=0,
                               progress=False, timer=fake_timer(), mem_cap="1GiB")
    assert [r["method"] for r in records] == ["dense", "blpa4"]
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all("cannot rebuild" in r["peak_skipped"] and "peak_bytes" not in r and "max_batch" not in r
               for r in records)
    out = capsys.readouterr().out
    assert out.count("skipped") == 1 and "package.module:factory" in out


def test_profile_factory_defined_in_a_function_skips_peak(capsys):
    def local_factory():
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))

    loss_calls = []

    def loss_fn(out):
        loss_calls.append(1)
        return out.pow(2).mean()

    records = leanprop.profile(local_factory, torch.randn(2, 3, 2, 2), methods="dense,blpa8", rounds=1,
                               loss_fn=loss_fn, progress=False, timer=fake_timer())
    assert "inside a function" in records[0]["peak_skipped"] and loss_calls
    assert records[1]["method"] == "blpa8" and "error" not in records[1]


def test_profile_bad_method_is_a_row(user_file):
    records = leanprop.profile(f"{user_file}:make_net", torch.randn(2, 3, 4, 4), methods=("dense", "blpa5x"),
                               rounds=1, peak=False, progress=False, timer=fake_timer())
    assert records[1]["error"].startswith("unknown method 'blpa5x'")
    assert "saved_bytes" not in records[1] and "error" not in records[0]


def test_profile_without_logits_skips_the_probe(user_file, capsys):
    records = leanprop.profile(f"{user_file}:features", torch.randn(2, 3, 6, 6), methods=("dense", "blpa4"),
                               rounds=1, progress=False, timer=fake_timer())
    assert all("logits" in r["peak_skipped"] and "error" not in r for r in records)
    assert records[1]["ratio_vs_dense"] < 1
    assert capsys.readouterr().out.count("skipped") == 1


@pytest.mark.slow
def test_profile_fresh_process_peak(user_file):
    records = leanprop.profile(f"{user_file}:make_net", torch.randn(4, 3, 8, 8), methods=("dense", "blpa4"),
                               rounds=1, progress=False, timer=fake_timer())
    for r in records:
        assert r["peak"]["ok"] and r["peak_bytes"] > 0 and r["step_peak_growth_bytes"] is not None
        assert "peak_skipped" not in r
    assert records[0]["peak_growth_ratio_vs_dense"] == 1.0


# --- one place: normalize_spec / build_model ------------------------------------------------------------


def test_build_model_calls_the_factory_with_classes_and_channels(user_file):
    spec = normalize_spec({"model": f"{user_file}:make_net", "input_shape": [1, 8, 8], "num_classes": 7})
    model, _ = build_model(spec)
    assert model.in_channels == 1 and model.fc.out_features == 7
    assert normalize_spec({"model": f"{user_file}:make_net"})["input_shape"] == [3, 32, 32]
    # no num_classes parameter: the classes are read off the output
    assert normalize_spec({"model": f"{user_file}:five_classes"})["num_classes"] == 5


def test_bench_memory_with_a_file_factory(user_file, tmp_path, capsys):
    out = tmp_path / "mem.jsonl"
    argv = ["bench", "memory", "--model", f"{user_file}:make_net", "--batch", "2", "--no-peak", "--method",
            "dense,blpa4", "--input-shape", "1x8x8", "--jsonl", str(out), "--progress", "off"]
    assert main(argv) == 0
    recs = {r["method"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert recs["dense"]["model"] == f"{user_file.resolve()}:make_net"
    assert recs["dense"]["input_shape"] == [1, 8, 8] and recs["dense"]["num_classes"] == 10
    assert recs["blpa4"]["ratio_vs_dense"] < 1
    assert "make_net" in capsys.readouterr().out


def test_bench_matrix_with_a_file_factory(user_file, tmp_path):
    out = tmp_path / "matrix.jsonl"
    argv = ["bench", "matrix", "--model", f"{user_file}:make_net", "--methods", "blpa4", "--batch", "2",
            "--rounds", "1", "--warmup", "0", "--no-peak", "--input-shape", "3x8x8", "--out", str(out),
            "--progress", "off"]
    assert main(argv) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in recs] == ["dense", "blpa4"]
    assert all(r["family"] == "custom" and r["input_shape"] == [3, 8, 8] for r in recs)


@pytest.mark.parametrize("model, msg", [
    ("{file}:not_a_model", "returned a value of type int, not a torch.nn.Module"),
    ("{file}:nothere", "has no attribute 'nothere'"),
    ("{dir}/missing.py:make_net", "no file"),
    ("no_such_package_xyz.models:make_net", "cannot import 'no_such_package_xyz.models'"),
    ("{dir}/broken.py:make_net", "importing"),
    ("a:b:c", "package.module:factory or path/to/file.py:factory"),
    ("resnet2O", "a model of your own: package.module:factory"),
])
def test_bench_memory_factory_errors(model, msg, user_file, capsys):
    (user_file.parent / "broken.py").write_text("raise RuntimeError('boom')\n")
    model = model.format(file=user_file, dir=user_file.parent)
    assert main(["bench", "memory", "--model", model, "--no-peak"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leanprop bench memory: error:") and msg in err and err.count("\n") == 1


def test_module_factory_reference_and_importable_callable(tmp_path, monkeypatch):
    import importlib
    import sys

    from leanprop.profile import _importable_ref

    pkg = tmp_path / "userpkg_h4"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(USER_MODEL))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("userpkg_h4", "userpkg_h4.nets"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    spec = normalize_spec({"model": "userpkg_h4.nets:make_net", "input_shape": [3, 8, 8]})
    assert spec["model"] == "userpkg_h4.nets:make_net" and spec["num_classes"] == 10
    assert isinstance(build_model(spec)[0], nn.Module)
    nets = importlib.import_module("userpkg_h4.nets")
    # a callable from an importable module: the probe imports it by name, with its package root on PYTHONPATH
    assert _importable_ref(nets.make_net) == ("userpkg_h4.nets:make_net", str(tmp_path), "")
    assert _importable_ref(nets.Net) == ("userpkg_h4.nets:Net", str(tmp_path), "")
