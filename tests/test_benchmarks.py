import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import train_throughput  # noqa: E402


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
    import swat_speed

    out = tmp_path / "s.jsonl"
    assert swat_speed.main(["--models", "resnet20", "--threads", "1", "--batch", "8", "--rounds", "3",
                            "--warmup", "1", "--topk-period", "2", "--out", str(out), "--report", ""]) == 0
    r = json.loads(out.read_text())
    assert r["bench"] == "swat_speed" and r["method"] == "swat-u90" and r["topk_period"] == 2
    assert r["ratio"] == pytest.approx(r["swat_ms"] / r["dense_ms"])
    assert 0.0 < r["measured"]["weight_sparsity"] < 0.9  # first layer dense, the rest at 90 %


def test_swat_accuracy_report_from_run_dirs(tmp_path):
    import swat_accuracy

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
    assert "| swat-m90 | 0/30 | not run yet |" in text
    assert "--set swat.distribution=momentum" in text and "--set train.epochs=30" in text
