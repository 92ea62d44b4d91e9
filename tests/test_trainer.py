import csv

import pytest
import torch

from leanprop import config as C
from leanprop.train.checkpoint import load_checkpoint
from leanprop.train.trainer import Trainer

from ._helpers import synth_overrides

SWAT_U = ["method.name=swat", "swat.sparsity=0.8", "swat.topk_period=3"]
SWAT_M = ["method.name=swat", "swat.sparsity=0.8", "swat.distribution=momentum", "swat.topk_period=2"]


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_train_writes_run_dir(tmp_path):
    cfg = C.load(None, synth_overrides(tmp_path, "train.epochs=2"))
    res = Trainer(cfg, progress=False).fit()
    d = res.run_dir
    assert {p.name for p in d.iterdir()} >= {"config.yaml", "env.json", "metrics.csv", "checkpoint.pt"}
    rows = _rows(d)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[-1]["test_top1"]) >= 0 and res.train_images_per_s > 0
    ck = load_checkpoint(d / "checkpoint.pt")
    assert ck["epoch"] == 2 and ck["step"] == 8 and ck["method"] is None
    # a second run with the same name never overwrites the first
    res2 = Trainer(C.load(None, synth_overrides(tmp_path, "train.epochs=1")), progress=False).fit()
    assert res2.run_dir.name == "t-2"


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("method", [[], SWAT_U, SWAT_M], ids=["dense", "swat-u", "swat-m"])
def test_resume_is_bit_identical(tmp_path, method):
    over = ["train.epochs=3", "data.augment=true", *method]
    ref = Trainer(C.load(None, synth_overrides(tmp_path / "a", *over)), progress=False)
    ref.fit()

    crashing = Trainer(C.load(None, synth_overrides(tmp_path / "b", *over)), progress=False)
    real_end = crashing._end_epoch
    calls = []

    def end_then_crash(*a, **k):
        row = real_end(*a, **k)
        calls.append(1)
        if len(calls) == 2:  # two epochs checkpointed, then the process "dies"
            raise Crash()
        return row

    crashing._end_epoch = end_then_crash
    with pytest.raises(Crash):
        crashing.fit()
    torch.manual_seed(12345)  # a resumed process starts with other RNG state
    resumed = Trainer(C.load(None, synth_overrides(tmp_path / "b", *over)), resume="auto", progress=False)
    assert resumed.run_dir == crashing.run_dir
    resumed.fit()
    assert resumed.epoch == 3 and resumed.step == ref.step
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    oa, ob = ref.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(oa[i]["momentum_buffer"], ob[i]["momentum_buffer"]) for i in oa)
    if method:
        sa, sb = ref.controller.state_dict(), resumed.controller.state_dict()
        assert sa["step"] == sb["step"] and sa["budget"] == sb["budget"]
        for name, la in sa["layers"].items():
            for key, value in la.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["layers"][name][key])), (name, key)
    keys = ["epoch", "step", "lr", "train_loss", "train_top1", "test_loss", "test_top1"]
    ra, rb = _rows(ref.run_dir), _rows(resumed.run_dir)
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]


def test_nan_loss_is_a_clear_error(tmp_path, monkeypatch):
    cfg = C.load(None, synth_overrides(tmp_path, "train.epochs=2"))
    t = Trainer(cfg, progress=False)
    t.model.register_forward_hook(lambda m, i, out: out * float("nan"))
    with pytest.raises(FloatingPointError, match="optim.lr"):
        t.fit()
    assert not (t.run_dir / "checkpoint.pt").exists()
    assert not list(t.run_dir.glob(".*tmp"))


def test_unknown_model_and_fp16_on_cpu(tmp_path):
    with pytest.raises(ValueError, match="resnet20"):
        Trainer(C.load(None, synth_overrides(tmp_path, "model.name=resnet2O")), progress=False)
    with pytest.raises(C.ConfigError, match="bf16"):
        Trainer(C.load(None, synth_overrides(tmp_path, "train.amp=fp16", "device=cpu")), progress=False)


@pytest.mark.parametrize("method", [[], SWAT_U], ids=["dense", "swat-u"])
def test_bf16_autocast_and_channels_last(tmp_path, method):
    cfg = C.load(None, synth_overrides(tmp_path, "train.epochs=1", "train.amp=bf16", "train.channels_last=true",
                                       *method))
    t = Trainer(cfg, progress=False)
    res = t.fit()
    assert float(res.final["train_loss"]) > 0
    if method:  # thresholds stay fp32 under autocast
        assert all(layer.x_threshold.dtype == torch.float32 for layer in t.controller.layers.values())
        assert any(float(layer.x_threshold) > 0 for layer in t.controller.layers.values())


def test_save_best_uses_validation_only(tmp_path):
    cfg = C.load(None, synth_overrides(tmp_path, "train.epochs=2", "data.val_split=16", "train.save_best=val"))
    res = Trainer(cfg, progress=False).fit()
    assert (res.run_dir / "best.pt").exists()
    assert res.best["epoch"] in (1, 2) and "val_top1" in res.best
    assert all(r["val_top1"] != "" for r in _rows(res.run_dir))


def test_swat_run_reports_flops_and_sparsity(tmp_path, capsys):
    cfg = C.load(None, synth_overrides(tmp_path, "train.epochs=1", *SWAT_U))
    res = Trainer(cfg, progress=False).fit()
    out = capsys.readouterr().out
    assert "training FLOPs -" in out and "measured sparsity" in out
    assert (res.run_dir / "swat_layers.txt").exists()
    row = _rows(res.run_dir)[-1]
    assert 0.5 < float(row["weight_sparsity"]) < 0.9  # first layer dense, the rest at 80 %
    assert load_checkpoint(res.run_dir / "checkpoint.pt")["method"]["step"] == 4


def test_resume_auto_restarts_a_run_that_died_before_its_first_checkpoint(tmp_path):
    cfg = C.load(None, synth_overrides(tmp_path, "train.epochs=1"))
    d = tmp_path / "t"
    d.mkdir()
    (d / "config.yaml").write_text("stale: true\n")
    (d / "metrics.csv").write_text("epoch,step\n1,4\n")  # a row whose checkpoint was never written
    res = Trainer(cfg, resume="auto", progress=False).fit()
    assert res.run_dir == d
    assert [r["epoch"] for r in _rows(d)] == ["1"] and _rows(d)[0]["test_top1"] != ""
