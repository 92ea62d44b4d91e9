import pytest

from leanprop.cli import main

from ._helpers import synth_overrides


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

    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setattr(cli.sys, "platform", "linux")
    monkeypatch.setattr(cli, "_jemalloc_path", lambda: "/fake/libjemalloc.so.2")
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
    monkeypatch.setattr(cli, "_jemalloc_path", lambda: None)
    monkeypatch.setenv("LD_PRELOAD", "")
    cli.reexec_under_jemalloc(["/bin/python", "script.py"])       # not installed
    assert calls == []
