"""`leanprop bench KIND`: every benchmark is a kind of the CLI, the scripts in benchmarks/ are thin calls to it, and
every timed number goes through leanprop.timing."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from leanprop import bench
from leanprop.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_bench_help_lists_every_kind(capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["bench", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for kind in bench.KINDS:
        assert re.search(rf"^\s+{kind}\b", text, re.M), kind
    for module in bench.kind_modules():  # each module names its kind and can run as a thin script's target
        assert callable(module.run) and callable(module.add_parser)


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_benchmark_scripts_are_thin_calls_to_a_kind(script):
    """No sys.path edits: a script imports the kind's ``main`` from the package and exits with it."""
    tree = ast.parse(script.read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [(n.module, [a.name for a in n.names]) for n in imports if isinstance(n, ast.ImportFrom)] == [
        (imports[0].module, ["main"])]
    assert imports[0].module.startswith("leanprop.bench.") and "sys.path" not in script.read_text()
    assert len(tree.body) <= 3  # docstring, import, raise SystemExit(main())


def test_a_script_runs_its_kind():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sparse_kernels.py"), "--formats", "xyz"],
                         capture_output=True, text=True, env={**os.environ, "LEANPROP_ALLOCATOR": "system"},
                         timeout=120)
    assert out.returncode == 2 and "leanprop bench kernels: error: --formats 'xyz'" in out.stderr


def test_kernels_kind_times_the_library_formats():
    from leanprop.bench.kernels import FORMATS
    from leanprop.swat.sparse_kernels import FORMATS as LIBRARY

    assert FORMATS == LIBRARY


def test_kernels_kind_measures_both_compiled_kernels_of_a_1x1_conv():
    """A 1x1 conv gets the direct and the pointwise forward + grad-input and layer (dW by the direct kernel); a 3x3
    conv the direct one only."""
    from leanprop.bench.kernels import measure
    from leanprop.ops.sparse_conv import load_sparse_conv

    if load_sparse_conv() is None:
        pytest.skip("no C compiler for the compiled kernels")
    got = measure(8, 16, 6, 1, 2, batch=2, s=0.9, reps=1, formats=("direct", "pointwise"))
    assert set(got["forward+grad_input"][1]) == {"direct", "pointwise"} == set(got["layer"][1])
    assert set(got["grad_weight"][1]) == {"direct"}
    got = measure(8, 16, 6, 3, 1, batch=2, s=0.9, reps=1, formats=("direct", "pointwise"))
    assert set(got["layer"][1]) == {"direct"} and set(got["forward"][1]) == {"direct"}


def test_no_timing_loop_outside_leanprop_timing():
    """The benchmarks, the matrix and the instruments time through leanprop.timing only."""
    places = [*(ROOT / "src" / "leanprop" / "bench").glob("*.py"), *(ROOT / "src" / "leanprop" / "accounting").glob(
        "*.py"), ROOT / "src" / "leanprop" / "swat" / "sparse_kernels.py", *SCRIPTS]
    for path in places:
        text = path.read_text()
        assert "perf_counter" not in text and "time.time(" not in text and "monotonic" not in text, path
