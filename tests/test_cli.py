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
