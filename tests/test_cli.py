import csv

import numpy as np
import pytest
import torch

from leanprop.cli import main

from ._helpers import SYNTH, synth_overrides


def _set(over):
    out = []
    for o in over:
        out += ["--set", o]
    return out


def test_train_eval_plot_cycle(tmp_path, capsys):
    assert main(["train", *_set(synth_overrides(tmp_path, "train.epochs=1"))]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "images/s" in out and "run dir" in out
    run = tmp_path / "t"
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt")]) == 0
    assert "top-1" in capsys.readouterr().out
    assert main(["plot", str(run)]) == 0
    png = run / "curves.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    # resume a finished run from its directory without a config: nothing left to do, still succeeds
    assert main(["train", "--resume", str(run), "--set", "train.progress=off"]) == 0


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["train", "--config", "nope.yaml"], "Config file not found"),
        (["train"], "needs --config"),
        (["train", "--set", "model.name=resnet2O", "--set", "data.name=synthetic"], "resnet20"),
        (["eval", "--checkpoint", "missing.pt"], "not found"),
        (["eval"], "needs --checkpoint"),
        (["plot", "no_such_run"], "metrics.csv"),
    ],
)
def test_bad_input_gives_clear_error(argv, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_models_lists_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("resnet20", "preact_resnet164", "resnet50", "cifar_densenet121"):
        assert name in out


def test_reexec_under_jemalloc_rules(monkeypatch):
    import leanprop.cli as cli
    import leanprop.utils as utils

    calls = []
    monkeypatch.setattr(utils.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setattr(utils.sys, "platform", "linux")
    monkeypatch.setattr(utils, "_jemalloc_path", lambda: "/fake/libjemalloc.so.2")
    monkeypatch.delenv("LEANPROP_ALLOCATOR", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "")
    cli._maybe_reexec_with_jemalloc(["models"])                   # not a long-running command
    assert calls == []
    cli._maybe_reexec_with_jemalloc(["bench", "matrix"])
    path, argv, env = calls.pop()
    assert argv[1:] == ["-m", "leanprop", "bench", "matrix"] and path == argv[0]
    assert env["LD_PRELOAD"] == "/fake/libjemalloc.so.2" and env["LEANPROP_ALLOCATOR"] == "jemalloc"
    cli.reexec_under_jemalloc(["/bin/python", "script.py", "--x"])
    assert calls.pop()[1] == ["/bin/python", "script.py", "--x"]
    monkeypatch.setenv("LEANPROP_ALLOCATOR", "system")            # turned off
    cli.reexec_under_jemalloc(["/bin/python", "script.py"])
    monkeypatch.setenv("LEANPROP_ALLOCATOR", "auto")
    monkeypatch.setenv("LD_PRELOAD", "/x/libjemalloc.so.2")       # already preloaded
    cli.reexec_under_jemalloc(["/bin/python", "script.py"])
    monkeypatch.setattr(utils, "_jemalloc_path", lambda: None)
    monkeypatch.setenv("LD_PRELOAD", "")
    cli.reexec_under_jemalloc(["/bin/python", "script.py"])       # not installed
    assert calls == []


# ------------------------------------------------------------------ a checkpoint means what the run measured
PREACT = ["model.name=preact_resnet8", "model.kwargs.shortcut=pad"]
METHODS = {
    "dense": [],
    "swat-u": ["method.name=swat", "swat.sparsity=0.8"],
    "swat-erk": ["method.name=swat", "swat.sparsity=0.8", "swat.distribution=erk"],
    "swat-filter": ["method.name=swat", "swat.sparsity=0.5", "swat.structure=filter"],
    "swat-packed": ["method.name=swat", "swat.sparsity=0.8", "swat.compress_saved=true"],
    "blpa4": [*PREACT, "method.name=blpa", "blpa.bits=4"],
    "swat+blpa4": [*PREACT, "method.name=swat+blpa", "swat.sparsity=0.8", "blpa.bits=4"],
}


def _last_row(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))[-1]


@pytest.fixture
def evaluations(monkeypatch):
    """Every ``evaluate`` result, in call order (the trainer's end-of-epoch one and the CLI's)."""
    from leanprop.train import trainer as trainer_mod

    results, real = [], trainer_mod.evaluate

    def recording(*a, **k):
        results.append(real(*a, **k))
        return results[-1]

    monkeypatch.setattr(trainer_mod, "evaluate", recording)
    return results


@pytest.mark.parametrize("method", list(METHODS), ids=list(METHODS))
def test_eval_and_export_reproduce_the_reported_accuracy(tmp_path, method, evaluations, capsys):
    """``leanprop eval --checkpoint`` applies the run's method (SWAT: the sparse weights and thresholds the run
    evaluated with; its BN statistics belong to them) and gives exactly the final test metrics of metrics.csv; the
    ``leanprop export`` weights give the same in the plain, unconverted model."""
    over = synth_overrides(tmp_path, "train.epochs=1", "model.name=resnet8", "data.synthetic_size=16",
                           *METHODS[method])
    assert main(["train", *_set(over)]) == 0
    run = tmp_path / "t"
    trained = evaluations[-1]
    row = _last_row(run)
    assert row["test_top1"] == f"{trained['top1']:.6g}" and row["test_loss"] == f"{trained['loss']:.6g}"

    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt")]) == 0
    again = evaluations[-1]
    assert (again["top1"], again["loss"], again["n"]) == (trained["top1"], trained["loss"], trained["n"])

    out = tmp_path / "plain.pt"
    assert main(["export", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out)]) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"wrote {out}" in hint and "leanprop eval --weights" in hint
    exported = torch.load(out, weights_only=True)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert exported.keys() == saved.keys()
    model = next(o.split("=", 1)[1] for o in reversed(over) if o.startswith("model.name="))
    kwargs = [o for o in over if o.startswith("model.kwargs.")]
    data = [o for o in SYNTH if o.startswith("data.")] + ["data.synthetic_size=16", "threads=1"]
    assert main(["eval", "--weights", str(out), "--model", model, "--dataset", "synthetic",
                 *_set(data + kwargs)]) == 0
    plain = evaluations[-1]
    assert plain["top1"] == trained["top1"] and plain["loss"] == pytest.approx(trained["loss"], rel=1e-6, abs=1e-6)
    changed = [k for k in saved if not torch.equal(saved[k], exported[k])]
    if "swat" in method:  # the exported weights are the pruned ones the run evaluated with
        assert changed and all(k.endswith("weight") for k in changed)
        assert all(int((exported[k] == 0).sum()) > int((saved[k] == 0).sum()) for k in changed)
    else:
        assert changed == []


def test_grayscale_npz_trains_evaluates_and_exports_through_the_cli(tmp_path, evaluations, capsys):
    """An npz of (N, H, W) uint8 images (one channel) trains: the model takes in_channels=1 from the data, and
    the data's own per-channel statistics normalise it."""
    rng = np.random.default_rng(0)
    path = tmp_path / "gray.npz"
    y_train, y_test = rng.integers(0, 3, 24), rng.integers(0, 3, 8)
    np.savez(path, x_train=rng.integers(0, 256, (24, 12, 12), dtype=np.uint8), y_train=y_train,
             x_test=rng.integers(0, 256, (8, 12, 12), dtype=np.uint8), y_test=y_test)
    data = ["data.name=npz", f"data.path={path}", "data.batch_size=8", "data.eval_batch_size=8"]
    over = [*data, "model.name=resnet8", "train.progress=off", "threads=1", f"out_dir={tmp_path}", "run_name=g",
            "train.epochs=1", "method.name=swat", "swat.sparsity=0.5"]
    assert main(["train", *_set(over)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    trained = evaluations[-1]
    ck = torch.load(tmp_path / "g" / "checkpoint.pt", weights_only=True)
    assert ck["model"]["conv1.weight"].shape[1] == 1 and ck["model_args"]["in_channels"] == 1
    assert main(["eval", "--checkpoint", str(tmp_path / "g" / "checkpoint.pt")]) == 0
    assert evaluations[-1]["top1"] == trained["top1"] and evaluations[-1]["n"] == 8
    plain = tmp_path / "g.pt"
    assert main(["export", "--checkpoint", str(tmp_path / "g" / "checkpoint.pt"), "--out", str(plain)]) == 0
    assert main(["eval", "--weights", str(plain), "--model", "resnet8", "--dataset", "npz",
                 *_set([f"data.path={path}", "data.eval_batch_size=8", "threads=1"])]) == 0
    assert evaluations[-1]["top1"] == trained["top1"]


def test_resume_of_a_finished_run_says_it_is_complete(tmp_path, capsys):
    assert main(["train", *_set(synth_overrides(tmp_path, "train.epochs=1"))]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "t"), "--set", "train.progress=off"]) == 0
    captured = capsys.readouterr()
    assert "run already complete: 1 of 1 epochs done" in captured.err and "raise train.epochs" in captured.err
    assert "0 images/s" not in captured.out + captured.err and "inf images/s" not in captured.out + captured.err


def test_export_and_eval_errors(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", *_set(synth_overrides(tmp_path, "train.epochs=1"))]) == 0
    capsys.readouterr()
    ck = str(tmp_path / "t" / "checkpoint.pt")
    assert main(["eval", "--weights", ck, "--model", "resnet20", "--dataset", "synthetic"]) == 2
    assert f"--checkpoint {ck}" in capsys.readouterr().err
    # a checkpoint from before model_args: export finds the classes and channels from the data
    state = torch.load(ck, weights_only=True)
    del state["model_args"]
    torch.save(state, tmp_path / "old.pt")
    assert main(["export", "--checkpoint", str(tmp_path / "old.pt"), "--out", str(tmp_path / "old_plain.pt")]) == 0
    assert torch.load(tmp_path / "old_plain.pt", weights_only=True).keys() == state["model"].keys()
