import csv
import functools

import pytest
import torch

import leanprop
from leanprop import config as C
from leanprop.blpa.config import BLPAConfig
from leanprop.methods import Controller
from leanprop.swat.config import SWATConfig
from leanprop.train.checkpoint import load_checkpoint
from leanprop.train.trainer import Trainer

from ._helpers import synth_overrides

SWAT_U = ["method.name=swat", "swat.sparsity=0.8", "swat.topk_period=3"]
SWAT_M = ["method.name=swat", "swat.sparsity=0.8", "swat.distribution=momentum", "swat.topk_period=2"]
# BLPA needs BN->ReLU->conv units: the pre-activation ResNet with the reference code's shortcuts
BLPA_4 = ["model.name=preact_resnet20", "model.kwargs.shortcut=pad", "method.name=blpa", "blpa.bits=4"]
SWAT_BLPA = ["model.name=preact_resnet20", "model.kwargs.shortcut=pad", "method.name=swat+blpa", "swat.sparsity=0.8",
             "swat.topk_period=3", "blpa.bits=4"]


@functools.cache
def _blpa_unsupported() -> str | None:
    """Why the BLPA trainer tests cannot run yet (None: convert_ accepts a BLPAConfig)."""
    from leanprop import models
    from leanprop.blpa.config import BLPAConfig
    from leanprop.nn.convert import convert_

    try:
        convert_(models.create("preact_resnet20", num_classes=10, shortcut="pad"), BLPAConfig())
    except TypeError as e:
        return f"leanprop.convert_ does not accept a BLPAConfig yet (the BLPA method is not in): {e}"
    return None


def _need_blpa(method) -> None:
    if "method.name=blpa" in method and _blpa_unsupported():
        pytest.skip(_blpa_unsupported())


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


@pytest.mark.parametrize("method", [[], SWAT_U, SWAT_M, BLPA_4, SWAT_BLPA],
                         ids=["dense", "swat-u", "swat-m", "blpa4", "swat+blpa4"])
def test_resume_is_bit_identical(tmp_path, method):
    _need_blpa(method)
    over = ["train.epochs=3", "data.augment=true", *method]
    if any(o.startswith("method.name=swat") for o in method):
        # two independent runs may time the kernels differently and pick another summation order; the resumed
        # run restores its crashed run's choice (tests/test_swat_sparse_kernels.py, resume test)
        over.append("swat.sparse_kernels=never")
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
    if "method.name=swat" in method or "method.name=swat+blpa" in method:
        sa, sb = ref.controller.state_dict(), resumed.controller.state_dict()
        if "swat" in sa:  # SWAT + BLPA: the SWAT part of the combined state
            sa, sb = sa["swat"], sb["swat"]
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


@pytest.mark.parametrize("method", [[], SWAT_U, BLPA_4], ids=["dense", "swat-u", "blpa4"])
def test_bf16_autocast_and_channels_last(tmp_path, method):
    _need_blpa(method)
    cfg = C.load(None, synth_overrides(tmp_path, "train.epochs=1", "train.amp=bf16", "train.channels_last=true",
                                       *method))
    t = Trainer(cfg, progress=False)
    res = t.fit()
    assert float(res.final["train_loss"]) > 0
    if method == SWAT_U:  # thresholds stay fp32 under autocast
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
    captured = capsys.readouterr()
    out = captured.out
    assert "training FLOPs -" in out and "measured sparsity" in out
    assert (res.run_dir / "swat_layers.txt").exists()
    assert "SWAT sparse kernels:" in captured.err  # sparse_kernels="auto": timed before the first step
    assert "layer-ops use a sparse kernel" in (res.run_dir / "swat_kernels.txt").read_text()
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


# ---------------------------------------------------------------- build_method and the method summary
class _FakeController(Controller):
    """A method plugged in through the Controller protocol: the trainer names no method, it only calls these."""

    name = "fake"

    def __init__(self):
        self.steps, self.epochs, self.prepared, self.optimizer = 0, [], 0, None

    def attach_optimizer(self, optimizer):
        self.optimizer = optimizer

    @property
    def needs_prepare(self):
        return self.prepared == 0

    def prepare(self, example_input, *, progress=None, timer=None, out_dir=None):
        self.prepared += 1
        return "fake prepared on a batch of " + str(example_input.shape[0])

    def step(self):
        self.steps += 1

    def on_epoch_start(self, epoch):
        self.epochs.append(epoch)

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]

    def metrics(self):
        return {"weight_sparsity": 0.25}

    def summary_lines(self, model, input_shape, out_dir=None):
        (out_dir / "fake_table.txt").write_text("table\n")
        return [f"  fake method on {tuple(input_shape)}"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], []),
        (["method.name=swat", "swat.sparsity=0.5"], [SWATConfig(sparsity=0.5)]),
        (["method.name=swat-erk80"], [SWATConfig(sparsity=0.8, distribution="erk")]),
        (["method.name=blpa", "blpa.bits=8"], [BLPAConfig(bits=8)]),
        (["method.name=blpa"], [BLPAConfig()]),
        (["method.name=blpa2+swat"], [SWATConfig(), BLPAConfig(bits=2)]),
        (["method.name=swat-u80+blpa", "blpa.bits=2", "swat.topk_period=5"],
         [SWATConfig(sparsity=0.8, topk_period=5), BLPAConfig(bits=2)]),
    ],
    ids=["dense", "swat", "swat-erk80", "blpa8", "blpa-defaults", "blpa2+swat", "preset+sections"],
)
def test_build_method_passes_the_method_configs_to_convert(monkeypatch, overrides, expected):
    from leanprop.train import trainer

    calls = []
    monkeypatch.setattr(trainer, "convert_", lambda model, config: calls.append(config) or "controller")
    out = trainer.build_method(torch.nn.Linear(2, 2), C.load(None, overrides))
    assert out == "controller" and calls == [expected]


def test_trainer_drives_any_method_through_the_protocol(tmp_path, monkeypatch, capsys):
    """A stand-in method: prepare on the first batch, step, epoch hooks, metrics, state and summary lines."""
    from leanprop.train import trainer

    fake = _FakeController()
    monkeypatch.setattr(trainer, "convert_", lambda model, config: fake)
    cfg = C.load(None, synth_overrides(tmp_path, "train.epochs=2", "method.name=blpa2"))
    res = Trainer(cfg, progress=False).fit()
    out, err = capsys.readouterr()
    assert fake.steps == 8 and fake.epochs == [0, 1] and fake.prepared == 1 and fake.optimizer is not None
    assert "fake prepared on a batch of 16" in err
    assert "  fake method on (1, 3, 32, 32)" in out
    assert (res.run_dir / "fake_table.txt").read_text() == "table\n"
    assert float(_rows(res.run_dir)[-1]["weight_sparsity"]) == 0.25
    assert load_checkpoint(res.run_dir / "checkpoint.pt")["method"] == {"steps": 8}


def test_blpa_summary_lines_write_the_unit_table(tmp_path):
    from leanprop import models

    model = models.create("preact_resnet8", num_classes=10, shortcut="pad")
    ctl = leanprop.convert_(model, BLPAConfig(bits=2, codec=False))
    (line,) = ctl.summary_lines(model, (1, 3, 32, 32), tmp_path)
    assert "2-bit codes" in line and "mode signaware" in line and "kept as they are" in line
    table = tmp_path / "blpa_units.txt"
    assert str(table) in line and table.read_text() == ctl.summary() + "\n"


def test_build_method_blpa_real():
    """The real BLPA conversion through the trainer's build_method (skipped until convert_ takes a BLPAConfig)."""
    if _blpa_unsupported():
        pytest.skip(_blpa_unsupported())
    from leanprop import models
    from leanprop.train.trainer import build_method

    model = models.create("preact_resnet20", num_classes=10, shortcut="pad")
    names = set(model.state_dict())
    ctl = build_method(model, C.load(None, BLPA_4))
    for attr in ("step", "on_epoch_start", "state_dict", "load_state_dict", "summary"):
        assert callable(getattr(ctl, attr)), attr
    assert set(model.state_dict()) == names  # same checkpoint keys as the plain model
    assert isinstance(ctl.summary(), str) and ctl.summary()


def test_blpa_run_writes_unit_table(tmp_path, capsys):
    if _blpa_unsupported():
        pytest.skip(_blpa_unsupported())
    cfg = C.load(None, synth_overrides(tmp_path, "train.epochs=1", *BLPA_4))
    res = Trainer(cfg, progress=False).fit()
    out = capsys.readouterr().out
    assert "BLPA activations  BN outputs stored as 4-bit codes" in out
    assert (res.run_dir / "blpa_units.txt").read_text().strip()
    assert float(res.final["train_loss"]) > 0 and _rows(res.run_dir)[-1]["weight_sparsity"] == ""


# ---------------------------------------------------------------- issue 12: syncs, resume on a GPU, DDP kernels
def test_no_host_sync_per_training_step(tmp_path):
    """With progress off (the default without a TTY) a training step never waits for the device: the loss and
    accuracy stay on it and are read at the end of the epoch (and every FINITE_CHECK_EVERY steps). Counted as
    aten._local_scalar_dense calls (what float()/item()/bool() of a tensor run), not timed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from leanprop.train import trainer as trainer_mod

    class HostSyncs(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                HostSyncs.n += 1
            return func(*args, **(kwargs or {}))

    cfg = C.load(None, synth_overrides(tmp_path, "train.epochs=1", "data.batch_size=4", "data.synthetic_size=8",
                                       "model.name=resnet8", "data.eval_batch_size=4"))
    t = Trainer(cfg, progress=False)
    steps = len(t.data.train)
    assert steps == 16 and trainer_mod.FINITE_CHECK_EVERY > steps
    real = t._train_epoch

    def counted():
        with HostSyncs():
            return real()

    t._train_epoch = counted
    t.fit()
    assert t.step == steps
    assert HostSyncs.n <= 3  # end of epoch: the finiteness check, loss and accuracy sums (was 3 per step)
    # evaluation reads its sums once, not per batch (was 3 per batch)
    HostSyncs.n = 0
    with HostSyncs():
        r = trainer_mod.evaluate(t.model, t.data.test, t.device)
    assert len(t.data.test) == 8 and r["n"] == 32 and HostSyncs.n <= 1


def test_resume_on_another_device_and_a_finished_run(tmp_path, monkeypatch, capsys):
    """Resume loads the checkpoint on the CPU (the RNG state must stay a CPU ByteTensor; loading it onto a GPU
    broke set_rng_state) and restores RNG tensors of any dtype; resuming a finished run says so, with no speeds."""
    from leanprop.train import trainer as trainer_mod

    over = synth_overrides(tmp_path, "train.epochs=1")
    Trainer(C.load(None, over), progress=False).fit()
    capsys.readouterr()
    # nothing left to do
    res = Trainer(C.load(None, over), resume="auto", progress=False).fit()
    captured = capsys.readouterr()
    assert "run already complete: 1 of 1 epochs done, 4 steps, in" in captured.err
    assert "raise train.epochs" in captured.err
    assert "images/s" not in captured.out + captured.err and "inf" not in captured.out
    assert res.final["epoch"] == "1" and res.epochs_run == 0
    # one more epoch, from a checkpoint whose RNG tensors were moved (as map_location="cuda" would) to another type
    seen = []
    real_load = trainer_mod.ckpt_io.load_checkpoint

    def moved_load(path, map_location="cpu"):
        seen.append(str(map_location))
        ck = real_load(path, map_location=map_location)
        ck["rng"]["torch"] = ck["rng"]["torch"].to(torch.int64)
        return ck

    monkeypatch.setattr(trainer_mod.ckpt_io, "load_checkpoint", moved_load)
    t = Trainer(C.load(None, synth_overrides(tmp_path, "train.epochs=2")), resume="auto", progress=False)
    t.fit()
    assert seen == ["cpu"] and t.epoch == 2 and [r["epoch"] for r in _rows(t.run_dir)] == ["1", "2"]
