"""Memory accounting: saved-tensor ledger, saved_bytes, per-block checkpointing, peak memory probe, max batch,
``leanprop bench memory`` and the report section."""

import contextlib
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanprop import models
from leanprop.accounting import memory_probe
from leanprop.accounting.memory import (
    SavedTensorLedger,
    apply_method,
    max_batch,
    parse_size,
    peak_memory,
    saved_bytes,
)
from leanprop.bench import memory as memory_cli
from leanprop.checkpointing.blocks import checkpoint_blocks_, checkpointed_blocks, uncheckpoint_blocks_
from leanprop.cli import main

F32 = 4


pytestmark = pytest.mark.usefixtures("one_thread")


# --- ledger ----------------------------------------------------------------------------------------------


def test_ledger_counts_a_storage_once_and_classifies():
    w = nn.Parameter(torch.zeros(10))
    ledger = SavedTensorLedger(parameters=[w])
    t = torch.zeros(4, 8)
    ledger.record(t)
    ledger.record(t)                    # the same tensor again
    ledger.record(t[:, :2])             # a view: its storage is already counted
    ledger.record(w[:3])                # shares a parameter's storage
    ledger.record(torch.zeros(6, dtype=torch.uint8))
    ledger.record(torch.zeros(3, dtype=torch.bool))
    ledger.record(torch.zeros(2, dtype=torch.int64))
    ledger.record(torch.zeros(2, dtype=torch.complex64))
    ledger.record(torch.zeros(5), kind="codes")   # the caller's kind wins (except for parameters)
    assert [r.duplicate for r in ledger.records] == [False, True, True, False, False, False, False, False, False]
    assert [r.kind for r in ledger.records] == ["float"] * 3 + ["parameter", "codes", "mask", "index", "other",
                                                                 "codes"]
    assert ledger.by_kind() == {"float": 128, "codes": 6 + 20, "mask": 3, "index": 16, "other": 16,
                                "parameter": 40}
    assert ledger.total_bytes == 128 + 26 + 3 + 16 + 16
    assert ledger.parameter_bytes == 40
    assert ledger.raw_bytes == 128 + 128 + 32 + 6 + 3 + 16 + 16 + 20  # before dedup, parameters excluded
    assert ledger.num_saved == 8 and ledger.num_unique == 6
    text = ledger.table()
    assert "total kept for backward" in text and "yes" in text
    ledger.release()


def test_relu_output_saved_by_relu_and_conv_counts_once():
    n, c, h, w = 2, 4, 5, 5
    model = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 3, 3, bias=False))
    r = saved_bytes(model, torch.randn(n, c, h, w))
    act = n * c * h * w * F32
    dups = [rec for rec in r.records if rec.duplicate]
    assert len(dups) == 1 and dups[0].shape == (n, c, h, w)       # ReLU output, saved again by the conv
    # BN input + ReLU output, + BN's save_mean / save_invstd (per channel); weights and running stats excluded
    assert r.total_bytes == 2 * act + 2 * c * F32
    assert r.raw_bytes == 3 * act + 2 * c * F32
    assert r.by_kind["parameter"] > 0 and r.via == "hooks"


def test_saved_bytes_linear_stack_matches_hand_count():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    before = [b.clone() for b in model.buffers()]
    r = saved_bytes(model, x)
    # linear1 keeps x; ReLU keeps its output, which linear2 keeps too (one storage); linear2 keeps its weight
    # (for grad-input), a parameter: excluded.  linear1 needs no grad-input (x needs no grad): no weight kept.
    assert r.total_bytes == 5 * 8 * F32 + 5 * 16 * F32
    assert r.by_kind == {"float": r.total_bytes, "parameter": 16 * 4 * F32}
    assert r.batch == 5 and r.bytes_per_sample == r.total_bytes / 5
    json.dumps(r.to_dict()) and json.dumps(r.to_dict(include_records=True))
    assert all(p.grad is None for p in model.parameters())          # model left as it was
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True))


def test_saved_bytes_conv_stack_matches_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(4, 2, 1, bias=False))
    model.eval()
    r = saved_bytes(model, torch.randn(2, 3, 6, 6))
    assert r.total_bytes == 2 * 3 * 36 * F32 + 2 * 4 * 36 * F32     # each conv keeps its input
    assert r.parameter_bytes == (4 * 3 * 9 + 2 * 4) * F32
    assert not model.training                                        # train/eval mode restored


def test_saved_bytes_by_origin_names_the_saving_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1, bias=False))
    r = saved_bytes(model, torch.randn(2, 3, 6, 6))
    act = 2 * 4 * 36 * F32
    # the ReLU output is also the last conv's input: one storage, counted for the ReLU that saved it first
    assert r.by_origin["Conv2d"] == 2 * 3 * 36 * F32
    assert r.by_origin["BatchNorm2d"] >= act and r.by_origin["ReLU"] == act
    assert sum(r.by_origin.values()) == r.total_bytes
    assert list(r.by_origin) == sorted(r.by_origin, key=lambda k: -r.by_origin[k])
    square = _Square()
    assert saved_bytes(square, torch.randn(2, 3, 6, 6, requires_grad=True)).by_origin == {"_Square": 2 * 3 * 36 * F32}
    assert not square._forward_hooks and not square._forward_pre_hooks   # the audit's hooks are removed


class _Square(nn.Module):
    def forward(self, x):
        return x * x


# --- checkpointing ---------------------------------------------------------------------------------------


def test_checkpoint_blocks_saves_memory_with_identical_gradients_and_keys():
    torch.manual_seed(0)
    dense = models.create("preact_resnet20")
    ck = copy.deepcopy(dense)
    assert checkpoint_blocks_(ck) == 9 and checkpoint_blocks_(ck) == 0      # 3 stages x 3 blocks, idempotent
    assert checkpointed_blocks(ck)[0] == "layer1.0"
    assert list(ck.state_dict()) == list(dense.state_dict())
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    d, c = saved_bytes(dense, x), saved_bytes(ck, x)
    assert c.total_bytes < 0.5 * d.total_bytes
    for m in (dense, ck):
        F.cross_entropy(m(x), y).backward()
    for (name, a), b in zip(dense.named_parameters(), ck.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name
    for a, b in zip(dense.buffers(), ck.buffers(), strict=True):   # BN stats updated once, not twice
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(dense.eval()(x), ck.eval()(x))
    copied = copy.deepcopy(ck)                                       # the wrapper follows the copy
    assert copied.layer1[0].forward.module is copied.layer1[0]
    assert uncheckpoint_blocks_(ck) == 9 and checkpointed_blocks(ck) == []
    assert saved_bytes(ck.train(), x).total_bytes == d.total_bytes


def test_checkpoint_blocks_by_type_and_models_without_blocks():
    m = models.create("resnet20")
    assert checkpoint_blocks_(m, block_types=nn.BatchNorm2d) == len(
        [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)])
    with pytest.raises(ValueError, match="no residual block"):
        apply_method(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), "checkpoint")


# --- BLPA through saved_bytes (skipped until convert_ accepts a BLPAConfig) ------------------------------


def test_blpa_keeps_less_than_dense():
    torch.manual_seed(0)
    dense = models.create("preact_resnet20", shortcut="pad")
    blpa = copy.deepcopy(dense)
    apply_method(blpa, "blpa4")
    x = torch.randn(4, 3, 32, 32)
    d, b = saved_bytes(dense, x), saved_bytes(blpa, x)
    assert b.total_bytes < 0.5 * d.total_bytes
    assert b.by_kind.get("codes", 0) > 0


def test_saved_bytes_lets_the_models_codec_record(monkeypatch):
    """Contract with leanprop.ops.codec: a codec found on the model records what it keeps via
    ``codec.recording(ledger)``; its hooks are inner-most, ours still see what is saved outside them."""
    from leanprop.accounting import memory

    class FakeCodec:
        """Keeps a 1-byte-per-element code for every float tensor of the model's forward."""

        def __init__(self):
            self.ledger = None

        @contextlib.contextmanager
        def recording(self, ledger):
            self.ledger = ledger
            yield
            self.ledger = None

        def pack(self, t):
            self.ledger.record(torch.zeros(t.numel(), dtype=torch.uint8), "codes")
            return t

    codec = FakeCodec()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model.register_forward_pre_hook(lambda m, a: setattr(m, "_ctx", torch.autograd.graph.saved_tensors_hooks(
        codec.pack, lambda t: t)) or m._ctx.__enter__())
    model.register_forward_hook(lambda m, a, o: m._ctx.__exit__(None, None, None))
    monkeypatch.setattr(memory, "find_codec", lambda m: codec if m is model else None)
    r = saved_bytes(model, torch.randn(5, 8), loss_fn=lambda out: (out * out).sum())
    assert r.via == "codec" and r.codec == "FakeCodec"
    # codes: x (40) + ReLU output twice (80 + 80, separate code tensors) + linear2 weight (64) elements;
    # float: the model output, saved twice by the loss's multiplication outside the codec (one storage)
    assert r.by_kind == {"float": 5 * 4 * F32, "codes": 40 + 80 + 80 + 64}


def test_saved_bytes_with_the_blpa_codec_if_present():
    codec_mod = pytest.importorskip("leanprop.ops.codec")
    if not hasattr(codec_mod, "SavedTensorCodec"):
        pytest.skip("leanprop.ops.codec has no SavedTensorCodec")
    model = models.create("preact_resnet20", shortcut="pad")
    x = torch.randn(2, 3, 16, 16)
    dense = saved_bytes(model, x)
    codec_mod.SavedTensorCodec(bits=4, min_bytes=0).attach(model)
    r = saved_bytes(model, x)
    assert r.via == "codec" and r.by_kind.get("codes", 0) > 0
    assert r.total_bytes < 0.25 * dense.total_bytes


# --- peak memory and max batch ---------------------------------------------------------------------------


def test_peak_memory_fresh_process_tiny_model():
    spec = {"model": "preact_resnet20", "input_shape": [3, 16, 16], "threads": 1}
    r = peak_memory(spec, 4, timeout=120)
    assert r["ok"], r
    assert r["batch"] == 4 and r["method"] == "dense" and r["device"] == "cpu"
    assert 20 * 2**20 < r["rss_before_bytes"] <= r["peak_bytes"] < 8 * 2**30
    assert 0 <= r["step_peak_growth_bytes"] < 2**30
    assert r["step_peak_rss_bytes"] == r["rss_before_bytes"] + r["step_peak_growth_bytes"]
    assert r["ru_maxrss_bytes"] > 0 and r["loss"] > 0


def test_memory_probe_rejects_a_bad_spec(capsys):
    assert memory_probe.main([json.dumps({"model": "nope", "batch": 1})]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_max_batch_finds_exact_boundary_with_fake_probe():
    calls = []

    def probe(b):
        calls.append(b)
        return {"ok": True, "peak_bytes": 1000 + 37 * b}

    seen = []
    res = max_batch(None, 1000 + 37 * 100, probe=probe, on_probe=seen.append)
    assert res.batch == 100 and not res.hit_limit
    assert calls[:8] == [1, 2, 4, 8, 16, 32, 64, 128] and len(calls) <= 15
    assert [p["batch"] for p in res.probes] == calls and seen == res.probes
    assert json.dumps(res.to_dict())
    assert max_batch(None, 1000 + 37 * 100 - 1, probe=probe).batch == 99


def test_max_batch_from_a_guess_halves_then_searches_and_tolerance_saves_probes():
    def probe(b):
        return {"ok": True, "peak_bytes": 1000 + 37 * b}

    cap = 1000 + 37 * 300
    high = max_batch(None, cap, probe=probe, start=4096)      # guess too high: halve down to a fit
    assert high.batch == 300 and high.fails == 301
    assert [p["batch"] for p in high.probes][:5] == [4096, 2048, 1024, 512, 256]
    exact = max_batch(None, cap, probe=probe, start=200)
    assert exact.batch == 300 and exact.fails == 301
    rough = max_batch(None, cap, probe=probe, start=200, tolerance=0.05)
    assert rough.batch <= 300 < rough.fails and rough.fails - rough.batch <= 0.05 * rough.batch
    assert len(rough.probes) < len(exact.probes)
    assert max_batch(None, 10, probe=lambda b: {"ok": True, "peak_bytes": 11}, start=8).batch == 0
    with pytest.raises(ValueError, match="tolerance"):
        max_batch(None, cap, probe=probe, tolerance=1.0)


def test_max_batch_treats_crashes_as_not_fitting():
    def crashy(b):
        return {"ok": False, "error": "probe killed by SIGKILL"} if b >= 50 else {"ok": True, "peak_bytes": b}

    assert max_batch(None, 10**9, probe=crashy).batch == 49
    assert max_batch(None, 10**9, probe=lambda b: None if b > 19 else {"peak_bytes": 1}).batch == 19
    assert max_batch(None, 10, probe=lambda b: {"ok": True, "peak_bytes": 11}).batch == 0
    top = max_batch(None, 10**9, probe=lambda b: {"ok": True, "peak_bytes": b}, limit=48)
    assert top.batch == 48 and top.hit_limit
    with pytest.raises(ValueError):
        max_batch(None, 0, probe=lambda b: None)


# --- CLI -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("512MiB", 512 * 2**20), ("4GiB", 4 * 2**30), ("1.5GB", 1_500_000_000), ("4G", 4 * 2**30),
    ("1000", 1000), ("64 kib", 64 * 1024), ("2mb", 2_000_000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "4GX", "GiB", "-1GiB", "0", "1.2.3MiB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="bad size"):
        parse_size(text)


def test_method_and_option_parsing():
    assert memory_cli.parse_methods(None) == ["dense", "checkpoint", "blpa8", "blpa4", "blpa2"]
    assert memory_cli.parse_methods(["dense,blpa4", "Dense", "checkpoint"]) == ["dense", "blpa4", "checkpoint"]
    with pytest.raises(ValueError, match="unknown method"):
        memory_cli.parse_methods(["dense,swot"])
    assert memory_cli.parse_input_shape("16") == [3, 16, 16]
    assert memory_cli.parse_input_shape("1x28x28") == [1, 28, 28]
    assert memory_cli.parse_model_args(["shortcut=pad", "n=3"]) == {"shortcut": "pad", "n": 3}
    assert memory_cli.default_model_kwargs("preact_resnet56", {}) == {"shortcut": "pad"}
    assert memory_cli.default_model_kwargs("preact_resnet56", {"shortcut": "projection"}) == {
        "shortcut": "projection"}
    assert memory_cli.default_model_kwargs("resnet20", {}) == {}


@pytest.mark.parametrize("argv, msg", [
    (["--model", "resnet2O"], "Did you mean 'resnet20'"),
    (["--model", "resnet20", "--method", "dense,sparse"], "unknown method 'sparse'"),
    (["--model", "resnet20", "--mem-cap", "4GX"], "bad size '4GX'"),
    (["--model", "resnet20", "--model-arg", "shortcut"], "KEY=VALUE"),
    (["--model", "resnet20", "--model-arg", "shortcut=pad"], "unexpected option"),
    (["--model", "resnet20", "--input-size", "3xa"], "bad --input-size"),
    (["--model", "resnet20", "--batch", "0"], "--batch must be >= 1"),
])
def test_bench_memory_bad_input_one_line_error(argv, msg, capsys):
    assert main(["bench", "memory", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leanprop bench memory: error:") and msg in err and err.count("\n") == 1


def test_bench_memory_runs_and_appends_jsonl(tmp_path, capsys):
    out = tmp_path / "mem.jsonl"
    argv = ["bench", "memory", "--model", "preact_resnet20", "--batch", "2", "--input-size", "16",
            "--method", "dense", "--method", "checkpoint", "--no-peak", "--threads", "1", "--jsonl", str(out),
            "--progress", "off"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "shortcut=pad" in text and "checkpoint" in text and "appended 2 record(s)" in text
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in recs] == ["dense", "checkpoint"]
    dense, ck = recs
    assert dense["bench"] == "memory" and dense["batch"] == 2 and dense["input_shape"] == [3, 16, 16]
    assert dense["model_kwargs"] == {"shortcut": "pad"} and dense["ratio_vs_dense"] == 1.0
    assert ck["ratio_vs_dense"] == pytest.approx(ck["saved_bytes"] / dense["saved_bytes"]) and ck["ratio_vs_dense"] < 1
    assert {"torch", "processor", "git_sha", "timestamp", "saved_by_kind"} <= set(dense)


def test_report_renders_memory_section(tmp_path):
    from leanprop.bench import report

    base = {"bench": "memory", "model": "preact_resnet164", "model_kwargs": {"shortcut": "pad"}, "batch": 128,
            "input_shape": [3, 32, 32], "device": "cpu", "dtype": "fp32", "threads": 2, "processor": "x"}
    recs = [{**base, "method": "dense", "saved_bytes": 3000 * 2**20, "ratio_vs_dense": 1.0,
             "peak_bytes": 4000 * 2**20, "step_peak_growth_bytes": 3500 * 2**20},
            {**base, "method": "blpa4", "saved_bytes": 200 * 2**20, "ratio_vs_dense": 200 / 3000,
             "max_batch": 900, "mem_cap_bytes": 4 * 2**30}]
    text = report.render(list(reversed(recs)))
    assert "## Memory kept for backward" in text
    assert "| preact_resnet164 (shortcut=pad) | 128 | dense | 3000.0 | 1.000 (1/1.0) | 4000.0 | 3500.0 | - |" in text
    assert "| blpa4 | 200.0 | 0.067 (1/15.0) | - | - | 900 (cap 4.00 GiB) |" in text
    mem = text[text.index("## Memory kept for backward"):]
    assert mem.index("| dense |") < mem.index("| blpa4 |")


def test_report_capacity_sections_and_plot(tmp_path):
    from leanprop.bench.report import write_report

    base = {"bench": "memory", "model": "resnet20", "batch": 128, "device": "cpu", "dtype": "fp32",
            "mem_cap_bytes": 4 * 2**30}
    recs = [{**base, "method": "dense", "saved_bytes": 1000, "ratio_vs_dense": 1.0, "max_batch": 1000,
             "max_batch_fails": 1010, "saved_by_origin": {"BatchNorm2d": 500, "ReLU": 500}},
            {**base, "method": "swat-u90-packed", "saved_bytes": 600, "ratio_vs_dense": 0.6, "max_batch": 1500,
             "max_batch_fails": 1530, "saved_by_origin": {"BatchNorm2d": 500, "SWATConv2d": 80, "MaskReLU": 20}}]
    results = tmp_path / "results"
    results.mkdir()
    (results / "memory.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "docs" / "benchmarks.md"
    write_report(results, out)
    text = out.read_text()
    assert "## Largest batch under a memory cap" in text and "### Cap 4.00 GiB" in text
    assert "| resnet20 | swat-u90-packed | 1500 | 1530 | 1.50 |" in text
    assert "| resnet20 | 128 | swat-u90-packed | 0.600 | BatchNorm2d 0.500, SWATConv2d 0.080, MaskReLU 0.020 |" in text
    assert (out.parent / "img" / "max_batch_4GiB.png").stat().st_size > 1000
    assert "](img/max_batch_4GiB.png)" in text
    from leanprop.bench.report import _headline_max_batch

    assert "under 4 GiB (fresh-process peak): resnet20: dense 1000, swat-u90-packed 1500 (1.50x)." in \
        _headline_max_batch(recs)
    # a search under another allocator setting is a row of its own, not the newest of the same row
    tuned = [{**r, "allocator": "system, mmap threshold 256 KiB", "max_batch": 2 * r["max_batch"]} for r in recs]
    older = [{**r, "allocator": "jemalloc", "max_batch": 7} for r in recs]  # another default allocator: superseded
    (results / "memory.jsonl").write_text("\n".join(json.dumps(r) for r in older + recs + tuned) + "\n")
    write_report(results, out)
    text = out.read_text()
    assert "| resnet20 | swat-u90-packed | 1500 | 1530 | 1.50 | cpu | fp32 | ? |" in text
    assert "| resnet20 | swat-u90-packed | 3000 | 1530 | 1.50 | cpu | fp32 | system, mmap threshold 256 KiB |" in text
    assert "| 7 |" not in text
    assert "resnet20 (malloc: mmap threshold 256 KiB): dense 2000, swat-u90-packed 3000 (1.50x)" in \
        _headline_max_batch(recs + tuned)


def test_checkpointed_blocks_run_under_torch_compile():
    """Dynamo cannot trace checkpoint's context_fn (it raised InternalTorchDynamoError): the checkpointed call runs
    eagerly inside the compiled model, with the eager gradients."""
    import torch._dynamo

    torch.manual_seed(0)
    eager = models.create("resnet8", num_classes=10)
    compiled = copy.deepcopy(eager)
    checkpoint_blocks_(eager)
    checkpoint_blocks_(compiled)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    torch._dynamo.reset()
    fwd = torch.compile(compiled, backend="aot_eager")
    for f in (eager, fwd):
        F.cross_entropy(f(x), y).backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()
