"""The execution-mode matrix: every method's training steps in each mode against its reference.

Same weights, same batch (16 images of 32x32, so two SWAT layer shapes take the large-tensor Top-K path), three SGD
steps; loss and parameter gradients compared per step (:mod:`leanprop.bench.modes`). References:
eager bf16 and CUDA modes against eager fp32 on the CPU, compiled against eager in the same dtype, channels-last
against contiguous. Modes a method cannot honour are refused by its controller (:mod:`leanprop.modes`).

Compile cases are `slow` (tens of seconds of Inductor compilation each on 2 cores; `.ci/run` runs them in their
own step); CUDA cases are marked `cuda` and skip without a GPU (benchmarks/gpu_check.sh runs them).
"""

import json

import pytest
import torch

from leanprop import config as C
from leanprop.bench.modes import METHODS, compare, grad_distance, reference_mode, run_steps
from leanprop.config import ConfigError
from leanprop.methods import Controller
from leanprop.modes import CompileStats, ExecutionMode, check_mode, unsupported_reason

from ._helpers import synth_overrides

NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False); run benchmarks/gpu_check.sh on a GPU machine"
cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]

EXACT = ("dense",)  # no Top-K selection and no codes: modes differ by rounding only

# Tolerances per mode and kind of method: (relative L2 distance of all parameter gradients at the first step, the
# same at every one of the three steps, the largest absolute loss difference). Measured on this CPU (torch 2.13,
# resnet8 / preact_resnet8, batch 16) and stated with a margin:
#  * cpu-bf16 against eager fp32: bf16 keeps 8 mantissa bits; dense gradients move ~5 % on these tiny random-init
#    nets, and SWAT's Top-K selections and BLPA's code boundaries move with the rounding (measured up to 15 % at the
#    first step, 20 % by the third).
#  * cpu-fp32-nhwc against contiguous: exact methods agree to summation order (2e-6); another summation order can
#    flip a Top-K selection or a code at its boundary (measured 3e-3 at the first step; by the third step a flip
#    among the last layer's ~100 kept inputs of SWAT+BLPA moved its gradient 14 %, all gradients 8 %).
#  * cpu-fp32-compile against eager fp32: 2e-2, the bound (measured at most 6e-4); dense agrees to 2e-6.
#  * cpu-bf16-compile against eager bf16, Inductor emulating eager's bf16 roundings: measured 1.2e-2 at the first
#    step (dense), growing with the steps as bf16 differences feed the weights (11 % by the third, SWAT).
#  * CUDA fp32 (TF32 off in these tests) against CPU fp32: another summation order, as channels-last; CUDA bf16 /
#    fp16 (GradScaler) against CPU fp32: as cpu-bf16; compiled on CUDA against eager CUDA: the 2e-2.
LOOSE_BF16 = {"exact": (0.08, 0.10, 2e-3), "other": (0.25, 0.35, 2e-3)}
TOLERANCE = {
    "cpu-bf16": LOOSE_BF16,
    "cpu-fp32-nhwc": {"exact": (1e-4, 1e-4, 1e-5), "other": (1e-2, 0.15, 1e-5)},
    "cpu-fp32-compile": {"exact": (1e-4, 1e-4, 1e-5), "other": (2e-2, 2e-2, 1e-5)},
    "cpu-bf16-compile": {"exact": (3e-2, 0.10, 2e-3), "other": (3e-2, 0.20, 2e-3)},
    "cuda-fp32": {"exact": (1e-3, 1e-3, 1e-4), "other": (2e-2, 0.15, 1e-4)},
    "cuda-bf16": LOOSE_BF16,
    "cuda-fp16": LOOSE_BF16,
    "cuda-fp32-compile": {"exact": (2e-2, 2e-2, 1e-4), "other": (2e-2, 2e-2, 1e-4)},
}


def tolerance(method: str, mode: str) -> tuple[float, float, float]:
    """(first-step gradient distance, every-step gradient distance, loss difference) allowed for ``method`` in
    ``mode``."""
    return TOLERANCE[mode]["exact" if method in EXACT else "other"]


@pytest.fixture
def strict_fp32():
    """CUDA fp32 without TF32 (cuDNN's default for convolutions), so fp32 on the GPU is compared as fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


_RUNS: dict = {}


def _run(method: str, mode: ExecutionMode, kept: bool = False):
    """Three steps of ``method`` in ``mode`` (``kept``: and the bytes kept for backward), computed once per test
    session."""
    key = (method, mode, kept)
    if key not in _RUNS:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _RUNS[key] = run_steps(method, mode, batch=16, steps=3, measure_kept=kept)
        finally:
            torch.set_num_threads(threads)
    return _RUNS[key]


def _check_against_reference(method: str, mode_name: str, kept: bool = False) -> dict:
    mode = ExecutionMode.parse(mode_name)
    rec = compare(method, mode, _run(method, mode, kept), _run(method, reference_mode(mode), kept), batch=16)
    first_tol, every_tol, loss_tol = tolerance(method, mode_name)
    msg = (f"{method} in {mode_name} vs {rec['reference']}: grad rel L2 per step {rec['grad_rel_l2_steps']}, worst "
           f"weight {rec['worst_param']} {rec['grad_rel_l2_worst']:.3g}, loss diff {rec['loss_diff']:.3g}")
    assert rec["grad_rel_l2_steps"][0] <= first_tol, msg
    assert rec["grad_rel_l2"] <= every_tol, msg
    assert rec["loss_diff"] <= loss_tol, msg
    return rec


# ------------------------------------------------------------------------------------------------ the matrix

@pytest.mark.parametrize("mode", ["cpu-bf16", "cpu-fp32-nhwc"])
@pytest.mark.parametrize("method", METHODS)
def test_eager_mode_matches_its_reference(method, mode):
    _check_against_reference(method, mode)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cpu-fp32-compile", "cpu-bf16-compile"])
@pytest.mark.parametrize("method", METHODS)
def test_compiled_step_matches_eager(method, mode):
    _check_against_reference(method, mode, kept=mode == "cpu-fp32-compile")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_compile_reports_graph_breaks_and_no_recompile_limit(method):
    """Three compiled steps (SWAT's Top-K step, then two steps reusing its thresholds): the graph breaks are
    counted and Dynamo never gives up on a frame (the recompile limit), which would run it eagerly unnoticed."""
    stats = _run(method, ExecutionMode("cpu", compile=True), kept=True).compile
    assert stats is not None and stats["graphs"] >= 1, stats
    assert isinstance(stats["graph_breaks"], int) and stats["graph_breaks"] >= 0
    assert stats["recompile_limit_hits"] == 0, stats


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_compiled_model_keeps_what_eager_keeps(method):
    """Bytes kept for backward (saved-tensor audit) under torch.compile within 2 % of eager's: the methods' own
    storage (SWAT's packed X_s, BLPA's codes) survives compilation. Known gap: BLPA's storage policy keeps nothing
    of a pooling input in eager (its backward reads only the shape), while a compiled graph saves the input and the
    codec, which no longer sees the op, codes it (+32-34 % on preact_resnet8, whose shortcuts average-pool)."""
    rec = compare(method, ExecutionMode("cpu", compile=True), _run(method, ExecutionMode("cpu", compile=True), True),
                  _run(method, ExecutionMode("cpu"), True))
    upper = 1.36 if "blpa" in method else 1.02
    assert 0.98 <= rec["kept_vs_ref"] <= upper, (rec["kept_bytes"], rec["kept_bytes_ref"])


@pytest.mark.parametrize("mode", [pytest.param(m, marks=cuda) for m in ("cuda-fp32", "cuda-bf16", "cuda-fp16")])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.usefixtures("strict_fp32")
def test_cuda_step_matches_cpu_fp32(method, mode):
    _check_against_reference(method, mode)


@pytest.mark.slow
@pytest.mark.parametrize("method", [pytest.param(m, marks=cuda) for m in ("dense", "swat-u90", "blpa4")])
@pytest.mark.usefixtures("strict_fp32")
def test_cuda_compiled_step_matches_eager(method):
    rec = _check_against_reference(method, "cuda-fp32-compile")
    assert rec["recompile_limit_hits"] == 0


# ------------------------------------------------------------------------------------------------ capabilities

class _Refuses(Controller):
    """A controller that cannot run compiled."""

    def unsupported_reason(self, mode):
        return "its thresholds cannot be traced; set train.compile=false" if mode.compile else None


def test_check_mode_refuses_what_the_controller_declares():
    check_mode(_Refuses(), ExecutionMode("cpu", "bf16", channels_last=True))
    with pytest.raises(ConfigError, match=r"method toy cannot train in mode cpu-bf16-compile .*thresholds cannot be "
                       r"traced; set train.compile=false"):
        check_mode(_Refuses(), ExecutionMode("cpu", "bf16", compile=True), method="toy")
    with pytest.raises(ConfigError, match="fp16 autocast needs a CUDA GPU.*use train.amp=bf16"):
        check_mode(Controller(), ExecutionMode("cpu", "fp16"))  # dense: the refusals every method shares


def _controller(method):
    from leanprop import models
    from leanprop.accounting.memory import apply_method

    return apply_method(models.create("preact_resnet8", num_classes=10, shortcut="pad"), method)


@pytest.mark.parametrize("method", ["swat-u90", "blpa4", "swat-u90+blpa4"])
def test_real_controllers_declare_their_modes(method):
    ctl = _controller(method)
    assert callable(ctl.unsupported_reason)
    for name in ("cpu-fp32", "cpu-bf16", "cpu-fp32-compile", "cpu-bf16-compile", "cpu-fp32-nhwc"):
        assert unsupported_reason(ctl, ExecutionMode.parse(name)) is None, name
    with pytest.raises(ConfigError, match="fp16"):
        check_mode(ctl, ExecutionMode("cpu", "fp16"), method=method)


def test_combined_controller_passes_on_either_methods_refusal(monkeypatch):
    from leanprop.blpa.controller import BLPAController

    ctl = _controller("swat-u90+blpa4")
    monkeypatch.setattr(BLPAController, "unsupported_reason", lambda self, mode: "no codes on Tuesdays")
    with pytest.raises(ConfigError, match="swat\\+blpa cannot train in mode cpu-fp32 .*no codes on Tuesdays"):
        check_mode(ctl, ExecutionMode("cpu"), method="swat+blpa")


def test_trainer_refuses_at_configuration_time(tmp_path, monkeypatch, capsys):
    """The trainer asks the method's controller before anything trains; the CLI prints the reason, no traceback."""
    from leanprop.cli import main
    from leanprop.swat.controller import SWATController
    from leanprop.train.trainer import Trainer

    monkeypatch.setattr(SWATController, "unsupported_reason",
                        lambda self, mode: "channels-last is not supported; set train.channels_last=false"
                        if mode.channels_last else None)
    over = synth_overrides(tmp_path, "method.name=swat", "train.channels_last=true", "device=cpu", "train.epochs=1")
    with pytest.raises(ConfigError, match="method swat cannot train in mode cpu-fp32-nhwc"):
        Trainer(C.load(None, over), progress=False)
    assert not (tmp_path / "t" / "checkpoint.pt").exists()
    assert main(["train", *[a for o in over for a in ("--set", o)]]) == 2
    err = capsys.readouterr().err
    assert "set train.channels_last=false" in err and "Traceback" not in err


def test_execution_mode_names_round_trip_and_bad_ones_say_how():
    for name in ("cpu-fp32", "cpu-bf16-compile", "cuda-fp16-nhwc", "cuda-fp32-compile-nhwc"):
        assert ExecutionMode.parse(name).name == name
    assert ExecutionMode.parse("cuda-compile") == ExecutionMode("cuda", None, compile=True)
    with pytest.raises(ValueError, match="e.g. cpu-bf16-compile"):
        ExecutionMode.parse("tpu-bf16")
    with pytest.raises(ValueError, match="'fp8' is not"):
        ExecutionMode.parse("cpu-fp8")
    assert reference_mode(ExecutionMode.parse("cuda-bf16-compile")).name == "cuda-bf16"
    assert reference_mode(ExecutionMode.parse("cpu-fp32-nhwc")).name == "cpu-fp32"
    assert reference_mode(ExecutionMode.parse("cuda-fp16")).name == "cpu-fp32"


# ------------------------------------------------------------------------------------------------ the instruments

def test_compile_stats_count_breaks_graphs_and_recompile_limit_hits():
    import torch._dynamo

    def f(x, n):
        x = x * 2
        torch._dynamo.graph_break()
        return x + n

    torch._dynamo.reset()
    g = torch.compile(f, backend="eager")
    with CompileStats() as stats:
        g(torch.ones(3), 1)
    assert stats.graph_breaks >= 1 and stats.graphs == 2 and stats.recompile_limit_hits == 0
    assert any("graph_break" in k for k in stats.as_dict()["break_reasons"]), stats.break_reasons
    torch._dynamo.reset()
    h = torch.compile(lambda x, n: x * n, backend="eager", dynamic=False)
    # the config's own patch: monkeypatch (pytest >= 9.2) restores a module attribute by deleting it, which hides
    # Dynamo's config entry for every later test
    with CompileStats() as stats, torch._dynamo.config.patch(recompile_limit=1):
        for n in (torch.ones(2), torch.ones(3, 3), torch.ones(4, 4, 4)):  # a new rank each call: a recompile
            h(n, n)
    assert stats.recompile_limit_hits >= 1
    torch._dynamo.reset()


def test_grad_distance_finds_the_worst_weight():
    ref = {"a.weight": torch.ones(4, 4, dtype=torch.float64), "a.bias": torch.ones(4, dtype=torch.float64)}
    run = {"a.weight": torch.ones(4, 4, dtype=torch.float64) * 1.1, "a.bias": torch.ones(4, dtype=torch.float64)}
    total, worst, name = grad_distance(run, ref)
    assert name == "a.weight" and worst == pytest.approx(0.1)
    assert total == pytest.approx(0.1 * 4 / 20**0.5)
    assert grad_distance({"a.weight": ref["a.weight"]}, ref)[0] == pytest.approx(2 / 20**0.5)  # missing = all off


def test_bench_modes_records_and_report(tmp_path):
    """`leanprop bench modes` writes one record per (method, mode) -- refusals included -- and `leanprop report`
    tabulates them per device."""
    from leanprop.cli import main

    out = tmp_path / "res" / "modes.jsonl"
    assert main(["bench", "modes", "--methods", "dense,blpa4", "--modes", "cpu-bf16,cpu-fp16", "--batch", "4",
                 "--steps", "2", "--threads", "1", "--progress", "off", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["mode"]) for r in recs] == [("dense", "cpu-bf16"), ("dense", "cpu-fp16"),
                                                        ("blpa4", "cpu-bf16"), ("blpa4", "cpu-fp16")]
    ok = recs[0]
    assert ok["bench"] == "modes" and ok["reference"] == "cpu-fp32" and len(ok["grad_rel_l2_steps"]) == 2
    assert 0 < ok["grad_rel_l2"] < 0.2 and ok["model"] == "resnet8" and recs[2]["model"] == "preact_resnet8"
    assert "fp16 autocast needs a CUDA GPU" in recs[1]["refused"]
    md = tmp_path / "benchmarks.md"
    assert main(["report", "--results", str(out.parent), "--out", str(md), "--readme", ""]) == 0
    text = md.read_text()
    assert "## Execution modes" in text and "| blpa4 | preact_resnet8 |" in text and "refused" in text


def test_modes_command_runs_named_models_against_plain_pytorch(tmp_path, capsys):
    """``--models`` runs each method on the models named (here one without BN->ReLU->conv units, whose BLPA-4 step
    is a 4-bit approximation), ``--exact`` measures both sides against plain PyTorch's gradients: dense's own
    distance is 0 in its reference mode, BLPA-4's is not, and the cosine says how close it stays."""
    from leanprop.cli import main

    out = tmp_path / "modes.jsonl"
    assert main(["bench", "modes", "--methods", "dense,blpa4", "--modes", "cpu-fp32-nhwc", "--models", "resnet8",
                 "--exact", "--batch", "4", "--steps", "1", "--threads", "1", "--progress", "off",
                 "--out", str(out)]) == 0
    dense, blpa = [json.loads(line) for line in out.read_text().splitlines()]
    assert dense["model"] == blpa["model"] == "resnet8" and blpa["method"] == "blpa4"
    assert dense["grad_rel_l2_exact_ref"] == 0.0 and dense["grad_cos_exact_ref"] == pytest.approx(1.0)
    assert dense["grad_rel_l2_exact"] < 1e-4  # channels-last dense against contiguous dense
    assert 1e-3 < blpa["grad_rel_l2_exact_ref"] < 0.3 and 0.95 < blpa["grad_cos_exact_ref"] < 1.0
    assert blpa["grad_rel_l2_exact"] == pytest.approx(blpa["grad_rel_l2_exact_ref"], rel=0.2)
    assert main(["bench", "modes", "--models", "no_such_net", "--out", str(out)]) == 2  # before running anything
    assert "unknown model 'no_such_net'" in capsys.readouterr().err and len(out.read_text().splitlines()) == 2
