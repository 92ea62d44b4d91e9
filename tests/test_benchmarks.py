import json
import os
from pathlib import Path

import pytest

from leanprop.bench import report, train_throughput

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_quick_throughput_writes_jsonl_and_report(tmp_path):
    out, md = tmp_path / "r" / "tp.jsonl", tmp_path / "bench.md"
    assert train_throughput.main(["--quick", "--no-data", "--threads", "1", "--out", str(out),
                                  "--report", str(md)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 1
    r = recs[0]
    assert r["model"] == "resnet20" and r["batch"] == 128 and r["threads"] == 1 and r["dtype"] == "fp32"
    assert r["images_per_s"] == pytest.approx(128 / (r["step_ms_median"] / 1000))
    assert {"torch", "processor", "allocator", "git_sha", "timestamp"} <= set(r)
    text = md.read_text()
    assert "| resnet20 | 128 | 1 | fp32 |" in text and "Do not edit by hand" in text
    # appending keeps old records; the report shows the newest per key
    train_throughput.main(["--quick", "--no-data", "--threads", "1", "--out", str(out), "--report", ""])
    assert len(out.read_text().splitlines()) == 2


def test_report_rejects_corrupt_jsonl(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"bench": "train_throughput"}\nnot json\n')
    with pytest.raises(ValueError, match="x.jsonl:2"):
        report.read_records(tmp_path)


def test_swat_speed_records_ratio(tmp_path):
    from leanprop.bench import swat_speed

    out = tmp_path / "s.jsonl"
    assert swat_speed.main(["--models", "resnet20", "--threads", "1", "--batch", "8", "--rounds", "3",
                            "--warmup", "1", "--topk-period", "2", "--out", str(out), "--report", ""]) == 0
    r = json.loads(out.read_text())
    assert r["bench"] == "swat_speed" and r["method"] == "swat-u90" and r["topk_period"] == 2
    assert r["ratio"] == pytest.approx(r["swat_ms"] / r["dense_ms"])
    assert 0.0 < r["measured"]["weight_sparsity"] < 0.9  # first layer dense, the rest at 90 %


def test_swat_filter_floor_records_the_decomposition(tmp_path):
    from leanprop.bench import swat_filter_floor

    out, md = tmp_path / "f.jsonl", tmp_path / "bench.md"
    assert swat_filter_floor.main(["--models", "resnet8", "--threads", "1", "--batch", "4", "--repeats", "1",
                                   "--rounds", "1", "--out", str(out), "--report", str(md)]) == 0
    r = json.loads(out.read_text())
    assert r["bench"] == "swat_filter_floor" and r["sparsity"] == 0.7 and r["period"] == 10
    first, second = r["layers"][0], r["layers"][1]
    assert first["kept"] == first["w"][0]                    # the first conv stays dense
    assert second["kept"] == -(-3 * second["w"][0] // 10)     # ceil(0.3 * C_out) kept filters
    c = r["conv_ms"]
    assert r["floor"] == pytest.approx((c["fwd_kept"] + c["igrad_kept"] + c["wgrad"] + r["other_ms"])
                                       / r["dense_step_ms"])
    assert r["measured"] == pytest.approx(r["filter_step_ms"] / r["dense_step_ms"])
    assert "## Filter-structured SWAT: how fast it could be" in md.read_text()


def test_swat_accuracy_report_from_run_dirs(tmp_path, monkeypatch):
    from leanprop.bench import accuracy_swat as swat_accuracy

    monkeypatch.setattr(swat_accuracy.MATRIX, "archive", tmp_path / "archive")  # not the committed rows
    out = tmp_path / "runs"
    fields = "epoch,step,test_top1,weight_sparsity,act_sparsity"
    for name, acc, epochs in (("dense", 90.0, 30), ("swat-u90", 88.5, 30), ("swat-erk90", 70.0, 12)):
        d = swat_accuracy.run_dir(out, "resnet20", name)
        d.mkdir(parents=True)
        sp = "" if name == "dense" else "0.9,0.88"
        (d / "metrics.csv").write_text(f"{fields}\n{epochs},{epochs * 391},{acc},{sp or ','}\n")
    md = tmp_path / "swat.md"
    text = swat_accuracy.report(out, "resnet20", 30, md)
    assert md.read_text() == text
    assert "| swat-u90 | 30/30 | 88.50 % | -1.50 |" in text
    assert "| swat-erk90 | 12/30 (in progress) | 70.00 % |  |" in text
    assert "| swat-u95 | 0/30 | not run yet |" in text and "--set swat.sparsity=0.95" in text
    assert "swat-m90" not in text  # not planned on resnet20 (the sparsity sweep) and never run there
    assert "| swat-m90 | 0/30 | not run yet |" in swat_accuracy.report(out, "resnet8", 30, md)  # planned there
    d = swat_accuracy.run_dir(out, "resnet20", "swat-m90")  # an unplanned variant shows once it has a run
    d.mkdir(parents=True)
    (d / "metrics.csv").write_text(f"{fields}\n3,1173,40.0,0.9,0.6\n")
    text = swat_accuracy.report(out, "resnet20", 30, md)
    assert "| swat-m90 | 3/30 (in progress) | 40.00 % |" in text and "--set swat.distribution=momentum" in text
    assert text.index("| swat-u95 |") < text.index("| swat-erk90 |") < text.index("| swat-m90 |")
    assert "--set train.epochs=30" in text


SWAT_U90_COMMAND = [
    "leanprop", "train", "--config", "configs/dense/cifar10_resnet18.yaml", "--set", "model.name=resnet20",
    "--set", "train.epochs=30", "--set", "schedule.name=cosine", "--set", "train.amp=bf16",
    "--set", "train.channels_last=true", "--set", "seed=0", "--set", "method.name=swat", "--set", "swat.sparsity=0.9",
    "--set", "swat.distribution=uniform", "--set", "swat.topk_period=10", "--set", "run_name=acc-resnet20-swat-u90",
]


class _Ran:
    """Stands in for subprocess.run in the runners: records the commands, trains nothing."""

    def __init__(self):
        self.commands = []

    def __call__(self, cmd, check):
        assert check is True
        self.commands.append(cmd)


def test_swat_accuracy_commands_and_run_names_are_unchanged(tmp_path, monkeypatch):
    """Runs in progress resume by run name and the report quotes these commands: they must not drift."""
    from leanprop.bench import accuracy as _accuracy_matrix
    from leanprop.bench import accuracy_swat as swat_accuracy

    monkeypatch.setattr(swat_accuracy.MATRIX, "archive", tmp_path / "archive")  # not the committed rows
    assert swat_accuracy.command("swat-u90", "resnet20", 30) == SWAT_U90_COMMAND
    assert swat_accuracy.run_dir(tmp_path, "resnet20", "swat-m90") == tmp_path / "acc-resnet20-swat-m90"
    assert next(iter(swat_accuracy.VARIANTS)) == "dense"  # the baseline; no variant of a finished run removed
    assert {"swat-u90", "swat-erk90", "swat-m90", "swat-channel70", "swat-filter70",
            "swat-filter70-p10"} <= set(swat_accuracy.VARIANTS)
    # the runner skips finished runs and resumes the others by name
    done = swat_accuracy.run_dir(tmp_path, "resnet20", "dense")
    done.mkdir(parents=True)
    (done / "metrics.csv").write_text("epoch,step,test_top1\n30,11730,90.0\n")
    ran = _Ran()
    monkeypatch.setattr(_accuracy_matrix.subprocess, "run", ran)
    md = tmp_path / "swat.md"
    assert swat_accuracy.main(["--out-dir", str(tmp_path), "--model", "resnet20", "--data-dir", "../shared/data",
                               "--report", str(md), "--only", "dense", "swat-u90"]) == 0
    assert ran.commands == [[*SWAT_U90_COMMAND, "--out-dir", str(tmp_path), "--resume", "auto", "--progress", "off",
                             "--data-dir", "../shared/data"]]
    assert "| dense | 30/30 | 90.00 % | +0.00 | 0 % |  |" in md.read_text()


def test_blpa_accuracy_commands_share_the_swat_recipe():
    from leanprop import config as C
    from leanprop.bench import accuracy_blpa as blpa_accuracy
    from leanprop.bench import accuracy_swat as swat_accuracy
    from leanprop.bench import accuracy_swat_blpa as swat_blpa_accuracy

    assert list(blpa_accuracy.VARIANTS) == ["dense", "blpa8", "blpa4", "blpa2", "swat-u90+blpa4", "blpa4-units",
                                            "blpa4-sr"]
    # the rows are the planned table; the two diagnostic rows appear once they have runs
    assert blpa_accuracy.PLANNED["resnet20"] == list(blpa_accuracy.VARIANTS)[:5]
    root = BENCH.parent
    for name, bits in (("dense", None), ("blpa8", 8), ("blpa4", 4), ("blpa2", 2), ("swat-u90+blpa4", 4),
                       ("blpa4-units", 4), ("blpa4-sr", 4)):
        cmd = blpa_accuracy.command(name, "resnet20", 30)
        assert cmd[:4] == ["leanprop", "train", "--config", cmd[3]] and (root / cmd[3]).is_file()
        sets = cmd[5::2]
        assert all(flag == "--set" for flag in cmd[4::2])
        cfg = C.load(root / cmd[3], sets)  # what `leanprop train` would run
        assert cfg.model.name == "resnet20" and cfg.data.name == "cifar10" and cfg.train.epochs == 30
        assert cfg.seed == 0 and cfg.train.amp == "bf16" and cfg.schedule.name == "cosine"
        assert cfg.run_name == f"acc-resnet20-{name}"
        if bits is None:
            assert cfg.method.name == "dense" and cfg.blpa is None
        else:
            assert cfg.blpa.bits == bits
        assert (cfg.swat is not None) == name.startswith("swat")
        if bits is not None:  # only the diagnostic rows leave the codes outside the units at their defaults
            assert cfg.blpa.outside_bits == (32 if name == "blpa4-units" else bits)
            assert cfg.blpa.stochastic_rounding == (name == "blpa4-sr" or bits == 2)
            assert cfg.blpa.policy == ({"batch_norm": 4} if name == "blpa4-units" else {})
    # one dense run for the SWAT, BLPA and SWAT+BLPA tables; the combined table's rows are the others' runs
    assert blpa_accuracy.command("dense", "resnet20", 30) == swat_accuracy.command("dense", "resnet20", 30)
    for name in swat_blpa_accuracy.VARIANTS:
        suite = swat_accuracy if name == "swat-u90" else blpa_accuracy
        assert swat_blpa_accuracy.MATRIX.command(name, "resnet20", 30) == suite.command(name, "resnet20", 30)
    assert "--set train.epochs=45" in " ".join(blpa_accuracy.command("blpa4", "resnet20", 45))


def test_blpa_accuracy_report_and_runner(tmp_path, monkeypatch):
    from leanprop.bench import accuracy as _accuracy_matrix
    from leanprop.bench import accuracy_blpa as blpa_accuracy

    monkeypatch.setattr(blpa_accuracy.MATRIX, "archive", tmp_path / "archive")  # not the committed rows
    out = tmp_path / "runs"
    for name, acc, epochs, cfg in (("dense", 91.0, 30, "method: {name: dense}\n"),
                                   ("blpa8", 90.5, 30, "method: {name: blpa}\nblpa: {bits: 8}\n"),
                                   ("blpa4", 60.0, 7, "method: {name: blpa}\nblpa: {bits: 4, codec: true}\n")):
        d = blpa_accuracy.run_dir(out, "resnet20", name)
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(cfg)
        rows = "".join(f"{e},{e * 391},{acc},{60 + e}\n" for e in range(1, epochs + 1))
        (d / "metrics.csv").write_text("epoch,step,test_top1,epoch_seconds\n" + rows)
    md = tmp_path / "blpa.md"
    text = blpa_accuracy.report(out, "resnet20", 30, md)
    assert md.read_text() == text
    assert "| method | epochs done | test top-1 | gap to dense |" in text
    assert "| dense | 30/30 | 91.00 % | +0.00 | as PyTorch (exact) | as PyTorch |  | 76 s |" in text
    assert "| blpa8 | 30/30 | 90.50 % | -0.50 | 8-bit codes | 8-bit codec |  | 76 s |" in text  # before the policy
    assert "| blpa4 | 7/30 (in progress) | 60.00 % |  | 4-bit codes | storage policy, 4-bit codes |  | 64 s |" in text
    assert "| blpa2 | 0/30 | not run yet | | | | | |" in text
    assert "resnet20, 30 epochs" in text and "bf16 autocast" in text
    assert ("- blpa2: `leanprop train --config configs/dense/cifar10_resnet18.yaml "
            "--set model.name=resnet20 --set train.epochs=30") in text
    # the runner trains what is unfinished (resuming by run name), then rewrites the report
    ran = _Ran()
    monkeypatch.setattr(_accuracy_matrix.subprocess, "run", ran)
    assert blpa_accuracy.main(["--out-dir", str(out), "--report", str(md)]) == 0
    names = [next(a for a in c if a.startswith("run_name="))[9:] for c in ran.commands]
    assert names == ["acc-resnet20-blpa4", "acc-resnet20-blpa2", "acc-resnet20-swat-u90+blpa4"]
    assert all(c[-6:] == ["--out-dir", str(out), "--resume", "auto", "--progress", "off"] for c in ran.commands)
    ran.commands.clear()
    assert blpa_accuracy.main(["--out-dir", str(out), "--report", str(md), "--report-only"]) == 0
    assert ran.commands == []
    # another model's default report sits next to the suite's own
    assert blpa_accuracy.MATRIX.report_path("mobilenet_v2").name == "blpa_mobilenet_v2.md"
    assert blpa_accuracy.MATRIX.report_path("resnet20").name == "blpa.md"


def test_bench_matrix_quick_records_resume_and_report(tmp_path, capsys, monkeypatch):
    """`leanprop bench matrix --quick` (what CI runs): one record per method with the ratios to the dense step of
    the same run, a second call skips what is measured, and `leanprop report` writes tables and plots."""
    from leanprop.cli import main

    out = tmp_path / "res" / "matrix.jsonl"
    assert main(["bench", "matrix", "--quick", "--threads", "1", "--progress", "off", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in recs] == ["dense", "swat-u90", "blpa4", "swat-u90+blpa4"]
    by = {r["method"]: r for r in recs}
    for r in recs:
        assert r["bench"] == "matrix" and r["model"] == "resnet20" and r["batch"] == 16 and r["threads"] == 1
        assert {"torch", "processor", "git_sha", "timestamp"} <= set(r)
        assert r["time_vs_dense"] == pytest.approx(r["step_s"] / by["dense"]["step_s"])
        assert len(r["step_s_all"]) == 2 and r["saved_bytes"] > 0
        assert [p[0] for p in r["kept_vs_batch"]] == [4, 8, 16]
    assert by["dense"]["train_flops_vs_dense"] == 1.0 and by["blpa4"]["train_flops_vs_dense"] == 1.0
    assert 0.05 < by["swat-u90"]["train_flops_vs_dense"] < 0.2  # first layer dense, the rest at 10 %
    assert by["blpa4"]["ratio_vs_dense"] < 0.4 and by["swat-u90+blpa4"]["ratio_vs_dense"] < 0.4
    # SWAT rows say which kernels the sparse_kernels="auto" calibration chose; the others have no such field
    assert "layer-ops (measured)" in by["swat-u90"]["sparse_kernels"] and "sparse_kernels" not in by["blpa4"]
    assert by["swat-u90"]["kernel_calibration_s"] > 0
    capsys.readouterr()
    assert main(["bench", "matrix", "--quick", "--threads", "1", "--progress", "off", "--out", str(out)]) == 0
    assert "already measured" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 4
    # under another allocator setting the same rows are measured again, recorded with it and tabled apart
    from leanprop import allocator

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(allocator, "set_mmap_threshold",  # this process keeps its allocator: only the record
                        lambda n: monkeypatch.setenv(allocator.MMAP_THRESHOLD_ENV, str(n)))
    assert main(["bench", "matrix", "--quick", "--threads", "1", "--progress", "off", "--out", str(out),
                 "--malloc-mmap-threshold", "256KiB"]) == 0
    tuned = [json.loads(line) for line in out.read_text().splitlines()[4:]]
    assert [r["method"] for r in tuned] == [r["method"] for r in recs]
    assert {r["allocator"] for r in tuned} == {"system, mmap threshold 256 KiB"}
    md = tmp_path / "docs" / "benchmarks.md"
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- report:headline -->\nold\n<!-- /report:headline -->\nrest\n")
    assert main(["report", "--results", str(out.parent), "--out", str(md), "--readme", str(readme)]) == 0
    head = readme.read_text()
    assert "\nold\n" not in head and head.endswith("<!-- /report:headline -->\nrest\n")
    assert "| resnet20 | 16 | blpa4 |" in head and "| resnet20 | 16 | swat-u90+blpa4 |" in head
    text = md.read_text()
    assert "## Every method on every model" in text and "| swat-u90+blpa4 |" in text
    # batch 16 and 1 thread are not the matrix's defaults: the table and its plots are named by them
    assert (md.parent / "img" / "matrix_time_resnet20-b16-1t.png").stat().st_size > 1000
    assert "![memory of resnet20-b16-1t](img/matrix_memory_resnet20-b16-1t.png)" in text
    assert "Kernels chosen by the SWAT layers' calibration" in text and "swat-u90: " in text
    assert "resnet20, malloc: mmap threshold 256 KiB" in text and "| swat-u90+blpa4 |" in text
    assert (md.parent / "img" / "matrix_time_resnet20-b16-1t-mmap256KiB.png").stat().st_size > 1000
    assert main(["report", "--results", str(tmp_path / "nothing"), "--out", str(md), "--readme", ""]) == 2


def test_bench_matrix_rejects_unknown_methods_and_models(capsys):
    from leanprop.cli import main

    assert main(["bench", "matrix", "--methods", "dense,sparse9", "--out", "/dev/null"]) == 2
    assert "unknown method 'sparse9'" in capsys.readouterr().err
    assert main(["bench", "matrix", "--models", "resnet21", "--out", "/dev/null"]) == 2
    assert "resnet20" in capsys.readouterr().err


def test_accuracy_runner_archives_finished_runs_and_trains_in_parallel(tmp_path, monkeypatch):
    """--jobs 2 runs variants as parallel processes (logs in OUT_DIR); a finished run's result files (never its
    checkpoint) go to the archive, from which the report and the skip logic read when OUT_DIR lacks the run."""
    from leanprop.bench import accuracy as _accuracy_matrix
    from leanprop.bench import accuracy_swat as swat_accuracy

    out, archive, md = tmp_path / "runs", tmp_path / "archive", tmp_path / "swat.md"
    started = []

    class FakeProc:  # a "training" that finishes at once with a complete metrics.csv
        def __init__(self, cmd, stdout, stderr):
            started.append(cmd)
            name = next(c for c in cmd if c.startswith("run_name=")).split("=", 1)[1]
            run = out / name
            run.mkdir(parents=True)
            (run / "metrics.csv").write_text("epoch,step,test_top1\n3,30,50.0\n")
            (run / "config.yaml").write_text("method: {name: swat}\n")
            (run / "checkpoint.pt").write_text("not archived")
            self.returncode = 0

        def poll(self):
            return 0

    monkeypatch.setattr(_accuracy_matrix.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(_accuracy_matrix.time, "sleep", lambda s: None)
    args = ["--out-dir", str(out), "--model", "resnet20", "--epochs", "3", "--report", str(md),
            "--archive", str(archive), "--jobs", "2", "--only", "dense", "swat-u90"]
    assert swat_accuracy.main(args) == 0
    assert len(started) == 2 and all(c[-2:] == ["--threads", str(max(1, (os.cpu_count() or 1) // 2))]
                                      for c in started)
    kept = archive / "acc-resnet20-dense"
    assert (kept / "metrics.csv").exists() and (kept / "config.yaml").exists()
    assert not (kept / "checkpoint.pt").exists()
    assert (out / "acc-resnet20-dense.log").exists()
    # a fresh machine: OUT_DIR empty, the archive still makes the table and stops retraining
    empty = tmp_path / "fresh"
    started.clear()
    assert swat_accuracy.main(["--out-dir", str(empty), *args[2:]]) == 0
    assert started == []
    assert "| dense | 3/3 | 50.00 % | +0.00 |" in md.read_text()
    with pytest.raises(SystemExit):
        swat_accuracy.main([*args, "--jobs", "0"])


def test_accuracy_runner_trains_further_seeds_and_reports_their_gaps(tmp_path, monkeypatch):
    """--seeds 0 1 trains each variant again as acc-<model>-<variant>-seed1 with seed=1 in its command; the table
    stays the seed-0 table and a column gives seed 1's accuracy, its gap to the seed-1 baseline and the mean gap."""
    from leanprop.bench import accuracy as _accuracy_matrix
    from leanprop.bench import accuracy_blpa

    out, archive, md = tmp_path / "runs", tmp_path / "archive", tmp_path / "blpa.md"
    acc = {("dense", "0"): 87.0, ("blpa4", "0"): 86.5, ("dense", "1"): 86.8, ("blpa4", "1"): 86.9}
    started = []

    def fake_run(cmd, check):
        started.append(cmd)
        sets = dict(cmd[i + 1].split("=", 1) for i, c in enumerate(cmd) if c == "--set")
        run = out / sets["run_name"]
        run.mkdir(parents=True)
        variant = "dense" if sets.get("method.name", "dense") == "dense" else "blpa4"
        (run / "metrics.csv").write_text(f"epoch,step,test_top1\n2,20,{acc[(variant, sets['seed'])]}\n")

    monkeypatch.setattr(_accuracy_matrix.subprocess, "run", fake_run)
    args = ["--out-dir", str(out), "--epochs", "2", "--report", str(md), "--archive", str(archive),
            "--only", "dense", "blpa4"]
    assert accuracy_blpa.main([*args, "--seeds", "0", "1"]) == 0
    names = [next(c for c in cmd if c.startswith("run_name=")) for cmd in started]
    assert names == ["run_name=acc-resnet20-dense", "run_name=acc-resnet20-blpa4",
                     "run_name=acc-resnet20-dense-seed1", "run_name=acc-resnet20-blpa4-seed1"]
    assert "seed=1" in started[2] and "seed=0" not in started[2] and "seed=0" in started[0]
    text = md.read_text()
    assert "other seeds (gap to dense of the same seed)" in text
    assert "| blpa4 | 2/2 | 86.50 % | -0.50 |" in text
    assert "seed 1: 86.90 % (+0.10); mean gap -0.20 over 2 seeds |" in text
    assert "seed 1: 86.80 % |" in text and "86.80 % (" not in text  # the baseline: no gap to itself
    assert "- blpa4, seed 1: `leanprop train" in text
    assert (archive / "acc-resnet20-blpa4-seed1" / "metrics.csv").exists()
    started.clear()  # everything finished: nothing trains again
    assert accuracy_blpa.main([*args, "--seeds", "0", "1"]) == 0 and started == []
    with pytest.raises(SystemExit):
        accuracy_blpa.main([*args, "--seeds", "-1"])


def test_archived_run_files_carry_no_machine_paths(tmp_path):
    """The archive is committed: the runs folder, the repository and the home folder are written as OUT_DIR, .
    and ~ (and the CSV's line ends are kept)."""
    from leanprop.bench import accuracy_swat as swat_accuracy

    out = tmp_path / "runs"
    d = swat_accuracy.run_dir(out, "resnet20", "dense")
    d.mkdir(parents=True)
    (d / "metrics.csv").write_bytes(b"epoch,step,test_top1\r\n30,11730,90.0\r\n")
    (d / "config.yaml").write_text(f"out_dir: {out.resolve()}\n")
    (d / "env.json").write_text(json.dumps({"argv": [str(BENCH.parent / "src" / "x.py"), str(Path.home())]}))
    matrix = swat_accuracy.MATRIX
    old = matrix.archive
    try:
        matrix.archive = tmp_path / "archive"
        dest = matrix.archive_run(out, "resnet20", "dense", 30)
    finally:
        matrix.archive = old
    assert (dest / "config.yaml").read_text() == "out_dir: OUT_DIR\n"
    assert json.loads((dest / "env.json").read_text())["argv"] == ["./src/x.py", "~"]
    assert (dest / "metrics.csv").read_bytes() == (d / "metrics.csv").read_bytes()


def test_sparse_kernel_report_lists_each_format_and_its_break_even():
    from leanprop.bench import report

    ratios = {("csr", 0.9): 1.5, ("csr", 0.99): 0.8, ("coo", 0.9): 1.2, ("coo", 0.99): 1.1}
    recs = [{"bench": "sparse_kernels", "layer": "64->64@32x32", "op": "forward", "batch": 32, "threads": 1,
             "processor": "p", "timestamp": "t", "sparsity": s, "format": f, "ratio": ratio}
            for (f, s), ratio in ratios.items()]
    recs.append({**recs[0], "format": None, "ratio": 9.0})  # a record from before the format field: CSR
    del recs[-1]["format"]
    recs.append({**recs[1], "batch": 128, "threads": 2, "ratio": 0.5})  # another batch: a row of its own
    text = "\n".join(report._sparse_kernels_section(recs))
    assert "| 64->64@32x32 | forward | csr | 128 | 2 |  | 0.50 | 99% |" in text
    recs.append({**recs[0], "batch": 64, "ratio": 3.0})  # measured at 90 % only: "none up to 90%"
    assert "| 64->64@32x32 | forward | csr | 64 | 1 | 3.00 |  | none up to 90% |" in "\n".join(
        report._sparse_kernels_section(recs))
    assert "| 64->64@32x32 | forward | csr | 32 | 1 | 9.00 | 0.80 | 99% |" in text
    assert "| 64->64@32x32 | forward | coo | 32 | 1 | 1.20 | 1.10 | none up to 99% |" in text


def test_direct_kernel_report_sets_direct_beside_sparseprop():
    from leanprop.bench import report

    base = {"bench": "sparse_kernels", "batch": 64, "threads": 2, "processor": "p", "timestamp": "t"}
    recs = []
    for layer, direct, sp in (("64->64@32x32", 10.0, 12.0), ("512->512@4x4", 9.0, 6.0)):
        for s in (0.9,):
            recs += [{**base, "layer": layer, "sparsity": s, "op": "forward+grad_input", "format": "direct",
                      "dense_ms": 20.0, "sparse_ms": direct, "ratio": direct / 20.0},
                     {**base, "layer": layer, "sparsity": s, "op": "forward", "format": "direct",
                      "dense_ms": 10.0, "sparse_ms": direct / 2, "ratio": direct / 20.0},
                     {**base, "layer": layer, "sparsity": s, "op": "forward+backward", "format": "sparseprop",
                      "dense_ms": 20.0, "sparse_ms": sp, "ratio": sp / 20.0}]
    recs += [{**base, "layer": "64->64@32x32", "sparsity": 0.9, "op": op, "format": "direct", "dense_ms": 10.0,
              "sparse_ms": ms, "ratio": ms / 10.0} for op, ms in (("grad_weight", 4.0), ("layer", 7.0))]
    text = "\n".join(report._direct_kernels_section(recs))
    assert "| 64->64@32x32 | 90% | 64 | 2 | 20.00 | 10.00 (0.50x) | 0.50x |  | 12.00 (0.60x) | 0.83 | 0.40x | 0.70x |" \
        in text
    assert "| 512->512@4x4 | 90% | 64 | 2 | 20.00 | 9.00 (0.45x) | 0.45x |  | 6.00 (0.30x) | 1.50 |  |  |" in text
    assert "at least as fast as SparseProp's forward + backward on 1 of 2 layer x sparsity cells at batch 64" in text
    assert "direct" not in "\n".join(report._sparse_kernels_section(recs))  # the CSR table keeps CSR/COO only
    # a sparsity sweep of the whole layer gives the break-even: the lowest sparsity winning at every higher one
    recs += [{**base, "layer": "64->64@32x32", "sparsity": sp, "threads": 1, "op": "layer", "format": "direct",
              "dense_ms": 10.0, "sparse_ms": ms, "ratio": ms / 10.0}
             for sp, ms in ((0.5, 9.0), (0.7, 11.0), (0.8, 8.0), (0.9, 6.0))]
    text = "\n".join(report._direct_kernels_section(recs))
    assert "| 64->64@32x32 | 64 | 1 | 0.90 | 1.10 | 0.80 | 0.60 | 80% |" in text
    assert "| 64->64@32x32 | 64 | 2 |  |  |  | 0.70 | 90% |" in text
    assert "| 64->64@32x32 | 90% | 64 | 1 |" not in text  # the side-by-side table keeps SparseProp's cells
    # a 1x1 layer: the pointwise kernel's cells where its forward + grad-input beats the direct one's
    one = {**base, "layer": "64->128@32x32 1x1/s2", "sparsity": 0.9}
    recs += [{**one, "op": "forward+backward", "format": "sparseprop", "dense_ms": 4.0, "sparse_ms": 3.0,
              "ratio": 0.75}]
    for fmt, ms in (("direct", 3.6), ("pointwise", 1.6)):
        recs += [{**one, "op": "forward+grad_input", "format": fmt, "dense_ms": 4.0, "sparse_ms": ms,
                  "ratio": ms / 4.0},
                 {**one, "op": "layer", "format": fmt, "dense_ms": 6.0, "sparse_ms": ms + 1.0,
                  "ratio": (ms + 1.0) / 6.0}]
    recs += [{**one, "op": "grad_weight", "format": "direct", "dense_ms": 2.0, "sparse_ms": 1.0, "ratio": 0.5}]
    text = "\n".join(report._direct_kernels_section(recs))
    assert "| 64->128@32x32 1x1/s2 (pointwise) | 90% | 64 | 2 | 4.00 | 1.60 (0.40x) |  |  | 3.00 (0.75x) | 0.53 | " \
        "0.50x | 0.43x |" in text
    assert "| 64->128@32x32 1x1/s2 | 64 | 2 |  |  |  | 0.43 | 90% |" in text  # the break-even: the faster kernel


def test_swat_packing_measures_bits_per_element(tmp_path):
    """The packed X_s costs what the mask form's formula says (plus small offsets), and indices where sparser."""
    from leanprop.bench import swat_packing
    from leanprop.bench.report import _packing_section

    out = tmp_path / "res" / "swat_packing.jsonl"
    assert swat_packing.main(["--shapes", "2,16,16,16", "--densities", "0.9,0.1,0.01", "--reps", "1", "--out",
                              str(out), "--report", ""]) == 0
    recs = {(r["dtype"], r["density"]): r for r in map(json.loads, out.read_text().splitlines())}
    fp32 = recs[("fp32", 0.1)]
    assert fp32["positions"] == "1-bit mask" and 4.2 <= fp32["bits_per_element"] < 4.35
    assert recs[("bf16", 0.1)]["bits_per_element"] < 0.65 * fp32["bits_per_element"]
    assert recs[("fp32", 0.01)]["positions"] == "int32 indices" and recs[("fp32", 0.01)]["bits_per_element"] < 0.7
    assert ("fp32", 0.9) not in recs  # post-ReLU, 90 % kept is above the non-zero share: threshold 0, skipped
    text = "\n".join(_packing_section(list(recs.values())))
    assert "## Packed X_s: bits per element" in text and "| (2, 16, 16, 16) | fp32 | 10% |" in text


def test_report_shows_compiled_over_eager_and_a_gpu_section(tmp_path):
    """Matrix records carry compile and device: compiled tables show step time / the eager step of the same
    settings and the graph breaks; CUDA records (matrix, modes, memory) go to their own section; the README
    headline keeps CPU eager records only."""
    from leanprop.bench.report import headline, render

    base = {"bench": "matrix", "model": "resnet20", "batch": 16, "threads": 2, "dtype": "fp32", "channels_last": False,
            "processor": "cpu-x", "git_sha": "abc", "saved_bytes": 2**20, "ratio_vs_dense": 1.0}

    def rec(method, step_s, **kw):
        return {**base, "method": method, "step_s": step_s, "time_vs_dense": step_s / 0.1, **kw}

    recs = [rec("dense", 0.1, device="cpu"), rec("swat-u90", 0.2, device="cpu"),  # eager, old records: no compile key
            rec("dense", 0.05, device="cpu", compile=True, graph_breaks=0),
            rec("swat-u90", 0.3, device="cpu", compile=True, graph_breaks=12),
            # a compiled record holding its own run's interleaved eager steps is divided by those
            {**rec("blpa4", 0.3, device="cpu", compile=True, graph_breaks=14), "eager_step_s": 0.25},
            rec("dense", 0.01, device="cuda", gpu="H100"), rec("blpa4", 0.02, device="cuda", gpu="H100"),
            {"bench": "modes", "model": "resnet8", "method": "dense", "mode": "cuda-bf16", "reference": "cpu-fp32",
             "device": "cuda", "gpu": "H100", "steps": 3, "batch": 16, "compile": False, "grad_rel_l2": 0.05,
             "grad_rel_l2_worst": 0.1, "torch": "2.11"},
            {"bench": "memory", "model": "resnet20", "batch": 64, "method": "blpa4", "device": "cuda", "gpu": "H100",
             "saved_bytes": 3 * 2**20, "ratio_vs_dense": 0.27, "peak_bytes": 50 * 2**20}]
    text = render(recs)
    compiled = text.split("### resnet20 (compiled)")[1].split("###")[0]
    assert "| dense | 50.0 | 0.500 | 0.500 | 0 |" in compiled
    assert "| swat-u90 | 300.0 | 3.000 | 1.500 | 12 |" in compiled
    assert "| blpa4 | 300.0 | 3.000 | 1.200 | 14 |" in compiled
    assert "x eager" in compiled and "x eager" not in text.split("### resnet20 (batch")[1].split("###")[0]
    cpu_part, gpu_part = text.split("## On a CUDA GPU")
    assert "on cuda" not in cpu_part and "H100" not in cpu_part
    assert "#### resnet20 on cuda (batch 16" in gpu_part and "| blpa4 | 20.0 |" in gpu_part
    assert "### Execution modes" in gpu_part and "| dense | resnet8 | 5.0e-02 / 5.0e-02 (1.0e-01) |" in gpu_part
    assert "### Memory on the GPU" in gpu_part and "| resnet20 | 64 | blpa4 | 3.0 | 0.270 | 50.0 | H100 |" in gpu_part
    packed = [{**r, "method": "swat-u90-packed"} for r in recs if r["bench"] == "matrix"]
    head = headline(packed)
    assert head.count("swat-u90-packed") == 1 and "| resnet20 | 16 | swat-u90-packed |" in head
    # fp32 at the largest batch measured only: a bf16 or a smaller-batch record adds no row
    more = [{**packed[0], "dtype": "bf16", "batch": 32}, {**packed[0], "batch": 8, "timestamp": "z"}]
    assert headline(packed + more) == head


def test_matrix_tables_never_mix_batches_dtypes_or_threads():
    """Each matrix table holds one setting: a bf16 run, another batch or another thread count gets its own table,
    headed by its own settings; the default batch of the model's family keeps the plain heading."""
    from leanprop.bench.report import render

    base = {"bench": "matrix", "model": "cifar_resnet18", "family": "cifar", "batch": 128, "threads": 2,
            "cpu_count": 2, "dtype": "fp32", "channels_last": False, "device": "cpu", "processor": "cpu-x",
            "git_sha": "abc", "saved_bytes": 2**20, "ratio_vs_dense": 1.0}

    def rec(method, step_s, dense_s, **kw):
        return {**base, "method": method, "step_s": step_s, "time_vs_dense": step_s / dense_s, **kw}

    recs = [rec("dense", 0.5, 0.5), rec("swat-u90", 0.35, 0.5),
            rec("dense", 0.3, 0.3, dtype="bf16"), rec("swat-u90", 0.33, 0.3, dtype="bf16"),
            rec("dense", 0.25, 0.25, batch=64), rec("swat-u90", 0.16, 0.25, batch=64),
            rec("dense", 0.9, 0.9, threads=1), rec("dense", 9.0, 9.0, input_shape=[3, 224, 224])]
    text = render(recs)
    tables = {t.split("\n")[0]: t for t in text.split("### cifar_resnet18")[1:]}
    heads = sorted(tables)
    assert heads == [" (batch 128, 1 threads, fp32, cpu, git abc)", " (batch 128, 2 threads, fp32, cpu, git abc)",
                     " (batch 64, 2 threads, fp32, cpu, git abc)",
                     " at 224x224 (batch 128, 2 threads, fp32, cpu, git abc)",
                     " in bf16 (batch 128, 2 threads, bf16, cpu, git abc)"]
    assert "| swat-u90 | 330.0 | 1.100 |" in tables[heads[4]] and "| swat-u90 | 350.0 | 0.700 |" in tables[heads[1]]
    assert tables[heads[1]].count("| dense |") == 1 and "| swat-u90 | 160.0 | 0.640 |" in tables[heads[2]]


def test_matrix_tables_never_mix_machines():
    """Records of a second CPU get tables of their own, named after it (their step ratios are that machine's);
    the CPU that ran most records keeps the plain tables and alone feeds the README headline."""
    from leanprop.bench.report import headline, render

    base = {"bench": "matrix", "model": "resnet20", "family": "cifar", "batch": 128, "threads": 2, "cpu_count": 2,
            "dtype": "fp32", "channels_last": False, "device": "cpu", "git_sha": "abc", "saved_bytes": 2**20,
            "ratio_vs_dense": 0.1}

    def rec(method, step_s, dense_s, cpu):
        return {**base, "method": method, "step_s": step_s, "time_vs_dense": step_s / dense_s, "processor": cpu}

    main, other = "Intel(R) Xeon(R) Processor", "AMD EPYC"
    recs = [rec("dense", 0.2, 0.2, main), rec("blpa4", 0.24, 0.2, main),
            rec("dense", 0.3, 0.3, other), rec("blpa4", 0.33, 0.3, other)]
    text = render(recs)
    tables = {t.split("\n")[0]: t for t in text.split("### resnet20")[1:]}
    assert sorted(tables) == [" (batch 128, 2 threads, fp32, cpu, git abc)",
                              " on AMD EPYC (batch 128, 2 threads, fp32, cpu, git abc)"]
    assert "| blpa4 | 240.0 | 1.200 |" in tables[" (batch 128, 2 threads, fp32, cpu, git abc)"]
    assert "| blpa4 | 330.0 | 1.100 |" in tables[" on AMD EPYC (batch 128, 2 threads, fp32, cpu, git abc)"]
    assert all(t.count("| dense |") == 1 for t in tables.values())
    head = headline(recs)
    assert "| resnet20 | 128 | blpa4 | 0.100 | 1.20 |" in head and "EPYC" not in head and "1.10" not in head

@pytest.mark.slow
def test_bench_matrix_compile_records_graph_breaks(tmp_path):
    """`leanprop bench matrix --compile` times compiled steps (warm-up absorbs the compilation) and records it."""
    from leanprop.cli import main

    out = tmp_path / "matrix.jsonl"
    assert main(["bench", "matrix", "--models", "resnet8", "--methods", "dense", "--batch", "4", "--rounds", "1",
                 "--warmup", "0", "--no-peak", "--compile", "--threads", "1", "--progress", "off",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["compile"] is True and r["warmup"] == 2 and r["graph_breaks"] == 0 and r["graphs"] >= 1
    assert r["compile_s"] > 0 and r["recompile_limit_hits"] == 0
    # the same model's eager steps, interleaved in the same run, give x eager
    assert len(r["eager_step_s_all"]) == 1 and r["time_vs_eager"] == pytest.approx(r["step_s"] / r["eager_step_s"])
    assert main(["bench", "matrix", "--models", "resnet8", "--methods", "dense", "--batch", "4", "--rounds", "1",
                 "--warmup", "0", "--no-peak", "--compile", "--threads", "1", "--progress", "off",
                 "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 1  # the compiled record counts as measured; eager would not


def test_blpa_grad_error_measures_each_part_against_exact_gradients():
    """32-bit codes everywhere give the exact gradient (cos 1, error 0); 4-bit BN codes alone move it; the report
    lists each variant."""
    import torch

    from leanprop import models
    from leanprop.bench.blpa_grad_error import measure
    from leanprop.bench.report import render

    torch.manual_seed(0)
    model = models.create("resnet8", num_classes=10)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen))
               for _ in range(2)]
    got = measure(model, batches, {"exact": {"bits": 32}, "units": {"bits": 4, "codec_bits": 32,
                                                                    "policy": {"batch_norm": 4}}})
    assert got["exact"]["cos"] == pytest.approx(1.0, abs=1e-6) and got["exact"]["rel_err"] < 1e-5
    assert got["exact"]["drift"] < 1e-5
    assert 0.5 < got["units"]["cos"] < 0.99999 and got["units"]["rel_err"] > 1e-3
    assert got["units"]["cos_min"] <= got["units"]["cos"]
    recs = [{"bench": "blpa_grad_error", "model": "resnet8", "state": "init (seed 0)", "variant": v, "batches": 2,
             **got[v]} for v in got]
    text = render(recs)
    assert "## BLPA gradient error by part" in text and "| resnet8 | init (seed 0) | dense | units | 2 |" in text


def test_blpa_grad_error_draws_the_same_dropout_masks_for_every_net():
    """A model with dropout: 32-bit codes still give the reference gradient exactly (without one seed per step
    the nets' dropout masks differ and the cosine falls far below 1)."""
    import torch
    from torch import nn

    from leanprop.bench.blpa_grad_error import measure

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 6 * 6, 10))
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    got = measure(model, batches, {"exact": {"bits": 32}})
    assert got["exact"]["cos"] == pytest.approx(1.0, abs=1e-9) and got["exact"]["rel_err"] < 1e-6


def test_blpa_grad_error_on_swat_measures_what_blpa_adds_to_swat():
    """``on="swat-u90"``: 32-bit codes on top of SWAT give SWAT's own gradient (cos 1; SWAT's gradient is far
    from the exact one, so a reference that were the exact gradient would fail this); 4-bit codes move it; a
    base that already holds BLPA is refused; the report names the combination."""
    import torch

    from leanprop import models
    from leanprop.bench.blpa_grad_error import measure
    from leanprop.bench.report import render

    torch.manual_seed(0)
    model = models.create("resnet8", num_classes=10)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen))
               for _ in range(2)]
    variants = {"exact": {"bits": 32}, "blpa4": {"bits": 4}}
    on_swat = measure(model, batches, variants, on="swat-u90")
    assert on_swat["exact"]["cos"] == pytest.approx(1.0, abs=1e-6) and on_swat["exact"]["rel_err"] < 1e-5
    assert 0.5 < on_swat["blpa4"]["cos"] < 0.99999 and on_swat["blpa4"]["rel_err"] > 1e-3
    with pytest.raises(ValueError, match="already holds BLPA"):
        measure(model, batches, variants, on="swat-u90+blpa8")
    recs = [{"bench": "blpa_grad_error", "model": "resnet8", "state": "init (seed 0)", "on": "swat-u90",
             "variant": v, "batches": 2, **on_swat[v]} for v in on_swat]
    assert "| resnet8 | init (seed 0) | swat-u90 | swat-u90+blpa4 | 2 |" in render(recs)
