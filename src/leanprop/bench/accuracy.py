"""``leanprop bench accuracy --suite swat|blpa|swat_blpa``: train an accuracy matrix (resumable) and write its
markdown table.

A matrix is a set of named variants of one recipe, each trained by one ``leanprop train`` command into
``OUT_DIR/acc-<model>-<variant>`` with ``--resume auto``, so a matrix can be trained in pieces across
sessions (a finished run is skipped, an interrupted one continues from its last epoch). The report is a
markdown table built from whatever the runs' ``metrics.csv`` files hold so far, with the exact command
of every row below it. A finished run's small result files (metrics, resolved config, environment, layer
summaries; never checkpoints) are copied to ``benchmarks/results/accuracy/<run>/``, which is committed: the
report falls back to that archive for runs absent from ``OUT_DIR``, so a committed table can be regenerated
(``--report-only``) on any machine, and a matrix trained over several sessions keeps its finished rows.
``--seeds 0 1`` trains the variants again with other seeds (``acc-<model>-<variant>-seed<N>``, seed 0 keeps the
plain name): the table stays the seed-0 table, and a column gives each further seed's accuracy and its gap to the
baseline of the same seed, so a gap that exceeds its bound can be checked against seed noise.
The suites (:mod:`.accuracy_swat`, :mod:`.accuracy_blpa`, :mod:`.accuracy_swat_blpa`) describe their variants,
the recipe text and their method-specific columns. Paths are relative to the working directory (run from the
repository root: the commands name ``configs/...``).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Matrix", "SUITES", "ARCHIVE", "ARCHIVED_FILES", "add_parser", "run", "read_rows", "suite"]

KIND = "accuracy"
ARCHIVE = Path("benchmarks") / "results" / "accuracy"
# what a finished run leaves that the report reads (checkpoints stay in OUT_DIR)
ARCHIVED_FILES = ("metrics.csv", "config.yaml", "env.json", "swat_layers.txt", "blpa_units.txt")
#: suite name -> the module holding its ``MATRIX``
SUITES = {"swat": "leanprop.bench.accuracy_swat", "blpa": "leanprop.bench.accuracy_blpa",
          "swat_blpa": "leanprop.bench.accuracy_swat_blpa"}

# (run dir, variant name, last metrics row) -> the text of one extra column
Column = Callable[[Path, str, dict], str]


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(KIND, help="train an accuracy matrix (resumable) and write its table (docs/results/)",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True, choices=list(SUITES),
                   help="swat: dense vs SWAT variants; blpa: exact vs BLPA-8/4/2; swat_blpa: SWAT + BLPA against "
                        "each alone")
    p.add_argument("--out-dir", default="runs/accuracy")
    p.add_argument("--model", help="default: the suite's (resnet20)")
    p.add_argument("--epochs", type=int, help="default: the suite's (30)")
    p.add_argument("--only", nargs="+", metavar="VARIANT", help="train only these variants of the suite")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED",
                   help="train every chosen variant with each of these seeds (default: 0; seed N > 0 runs are "
                        "named acc-<model>-<variant>-seed<N>)")
    p.add_argument("--data-dir")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--report", help="default: docs/results/<suite>.md (another model than the suite's: "
                                    "<suite>_<model>.md)")
    p.add_argument("--threads", type=int, help="torch threads of each training run (default: cores / jobs)")
    p.add_argument("--archive", help="where finished runs' result files are copied (committed; the report falls "
                                     f"back to it; default: {ARCHIVE})")
    p.add_argument("--jobs", type=int, default=1,
                   help="variants trained at once (each in its own process, its log in OUT_DIR/<run>.log)")
    p.set_defaults(bench_run=run)


def suite(name: str) -> Matrix:
    """The :class:`Matrix` of a suite of :data:`SUITES`."""
    return importlib.import_module(SUITES[name]).MATRIX


def run(a: argparse.Namespace) -> int:
    return suite(a.suite).run(a)


@dataclass
class Matrix:
    """One accuracy matrix.

    variants: name -> (config file, ``key=value`` overrides of that variant). The first variant is the
        baseline the "gap" column refers to.
    common: (model, epochs) -> the overrides every variant shares (placed before the variant's own).
    intro: (model, epochs) -> the paragraph under the title describing the recipe.
    columns: extra columns after "gap to <baseline>", as (header, cell function) pairs.
    planned: model -> the variants its table lists and a plain run trains (default: every variant); a variant
        outside it still gets a row once it has a run.
    """

    title: str
    variants: dict[str, tuple[str, list[str]]]
    common: Callable[[str, int], list[str]]
    intro: Callable[[str, int], str]
    columns: list[tuple[str, Column]] = field(default_factory=list)
    planned: dict[str, list[str]] = field(default_factory=dict)
    default_model: str = "resnet20"
    default_epochs: int = 30
    default_report: Path = Path("docs") / "results" / "accuracy.md"
    archive: Path = ARCHIVE

    @property
    def baseline(self) -> str:
        return next(iter(self.variants))

    def listed(self, out_dir: Path, model: str) -> list[str]:
        """The variants of ``model``'s table, in suite order: the planned ones and any other that has a run."""
        plan = self.planned.get(model, list(self.variants))
        return [n for n in self.variants
                if n in plan or read_rows(self.result_dir(out_dir, model, n))]

    def run_name(self, model: str, name: str, seed: int = 0) -> str:
        return f"acc-{model}-{name}" + (f"-seed{seed}" if seed else "")

    def run_dir(self, out_dir: Path, model: str, name: str, seed: int = 0) -> Path:
        return out_dir / self.run_name(model, name, seed)

    def result_dir(self, out_dir: Path, model: str, name: str, seed: int = 0) -> Path:
        """Where the report reads a run from: ``OUT_DIR`` when it holds the run, else the committed archive."""
        d = self.run_dir(out_dir, model, name, seed)
        if (d / "metrics.csv").exists():
            return d
        kept = self.archive / self.run_name(model, name, seed)
        return kept if (kept / "metrics.csv").exists() else d

    def seeds_run(self, out_dir: Path, model: str) -> list[int]:
        """The seeds > 0 of which some variant has a run in ``OUT_DIR`` or the archive (ascending)."""
        found = set()
        for where in (out_dir, self.archive):
            for name in self.variants:
                for d in where.glob(f"{self.run_name(model, name)}-seed*"):
                    tail = d.name[len(self.run_name(model, name)) + len("-seed"):]
                    if tail.isdigit() and (d / "metrics.csv").exists():
                        found.add(int(tail))
        return sorted(found)

    def archive_run(self, out_dir: Path, model: str, name: str, epochs: int, seed: int = 0) -> Path | None:
        """Copy a finished run's small result files into the archive (atomically per file)."""
        d = self.run_dir(out_dir, model, name, seed)
        rows = read_rows(d)
        if not rows or int(rows[-1]["epoch"]) < epochs:
            return None
        dest = self.archive / self.run_name(model, name, seed)
        dest.mkdir(parents=True, exist_ok=True)
        for f in ARCHIVED_FILES:
            if (d / f).exists():
                tmp = dest / f".{f}.tmp"
                tmp.write_bytes(_portable((d / f).read_bytes().decode(), out_dir).encode())  # keep line ends
                tmp.replace(dest / f)
        return dest

    def report_path(self, model: str) -> Path:
        """The default report of ``model``: ``default_report`` for the default model, else ``<stem>_<model>.md``."""
        r = self.default_report
        return r if model == self.default_model else r.with_name(f"{r.stem}_{model}{r.suffix}")

    def command(self, name: str, model: str, epochs: int, seed: int = 0) -> list[str]:
        """The row's ``leanprop train`` command; another seed replaces the recipe's ``seed=`` override."""
        config, own = self.variants[name]
        common = [f"seed={seed}" if s.startswith("seed=") else s for s in self.common(model, epochs)]
        if seed and f"seed={seed}" not in common:
            common.append(f"seed={seed}")
        sets = [*common, *own, f"run_name={self.run_name(model, name, seed)}"]
        return ["leanprop", "train", "--config", config, *[a for s in sets for a in ("--set", s)]]

    def _final(self, out_dir: Path, model: str, name: str, epochs: int, seed: int) -> float | None:
        """The finished run's final test top-1, None while it is unfinished or absent."""
        rows = read_rows(self.result_dir(out_dir, model, name, seed))
        return float(rows[-1]["test_top1"]) if rows and int(rows[-1]["epoch"]) >= epochs else None

    def _other_seeds(self, out_dir: Path, model: str, name: str, epochs: int, seeds: list[int]) -> str:
        """``seed N: acc (gap to the baseline of seed N)`` for each further seed of the row, and the mean gap over
        every seed whose pair is finished."""
        cells, gaps = [], []
        base0, acc0 = (self._final(out_dir, model, n, epochs, 0) for n in (self.baseline, name))
        if base0 is not None and acc0 is not None:
            gaps.append(acc0 - base0)
        for seed in seeds:
            rows = read_rows(self.result_dir(out_dir, model, name, seed))
            if not rows:
                continue
            acc, done = float(rows[-1]["test_top1"]), int(rows[-1]["epoch"])
            if done < epochs:
                cells.append(f"seed {seed}: {done}/{epochs} epochs")
                continue
            base = self._final(out_dir, model, self.baseline, epochs, seed)
            if base is None or name == self.baseline:
                cells.append(f"seed {seed}: {acc:.2f} %")
            else:
                gaps.append(acc - base)
                cells.append(f"seed {seed}: {acc:.2f} % ({acc - base:+.2f})")
        if len(gaps) > 1:
            cells.append(f"mean gap {sum(gaps) / len(gaps):+.2f} over {len(gaps)} seeds")
        return "; ".join(cells)

    def report(self, out_dir: Path, model: str, epochs: int, path: Path) -> str:
        from leanprop.utils import atomic_write_text

        seeds = self.seeds_run(out_dir, model)
        headers = ["method", "epochs done", "test top-1", f"gap to {self.baseline}", *(h for h, _ in self.columns)]
        if seeds:
            headers.append(f"other seeds (gap to {self.baseline} of the same seed)")
        lines = [f"# {self.title}", "", self.intro(model, epochs), "",
                 "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        base = read_rows(self.result_dir(out_dir, model, self.baseline))
        base_acc = float(base[-1]["test_top1"]) if base and int(base[-1]["epoch"]) >= epochs else None
        cmds = []
        for name in self.listed(out_dir, model):
            d = self.result_dir(out_dir, model, name)
            rows = read_rows(d)
            cmd = " ".join(shlex.quote(c) for c in self.command(name, model, epochs))
            cmds.append(f"- {name}: `{cmd}`")
            for seed in seeds:
                if read_rows(self.result_dir(out_dir, model, name, seed)):
                    cmd = " ".join(shlex.quote(c) for c in self.command(name, model, epochs, seed))
                    cmds.append(f"- {name}, seed {seed}: `{cmd}`")
            other = [self._other_seeds(out_dir, model, name, epochs, seeds)] if seeds else []
            if not rows:
                lines.append(f"| {name} | 0/{epochs} | not run yet |" + " |" * (1 + len(self.columns))
                             + "".join(f" {o} |" for o in other))
                continue
            last = rows[-1]
            acc = float(last["test_top1"])
            done = int(last["epoch"])
            status = f"{done}/{epochs}" + ("" if done >= epochs else " (in progress)")
            gap = f"{acc - base_acc:+.2f}" if (base_acc is not None and done >= epochs) else ""
            cells = [name, status, f"{acc:.2f} %", gap, *(cell(d, name, last) for _, cell in self.columns), *other]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Commands (run from the repository root, data via `--data-dir` or `LEANPROP_DATA`):", "",
                  *cmds, ""]
        text = "\n".join(lines)
        atomic_write_text(path, text)
        return text

    def run(self, a: argparse.Namespace) -> int:
        """Train what is unfinished (``a``: the ``leanprop bench accuracy`` arguments), then write the report."""
        model = a.model or self.default_model
        epochs = a.epochs if a.epochs is not None else self.default_epochs
        report = Path(a.report) if a.report else self.report_path(model)
        unknown = [n for n in a.only or () if n not in self.variants]
        if unknown:
            raise ValueError(f"--only {' '.join(unknown)}: not a variant of this suite; choose from "
                             f"{', '.join(self.variants)}")
        if a.jobs < 1:
            raise SystemExit("--jobs must be >= 1")
        out = Path(a.out_dir)
        if a.archive:
            self.archive = Path(a.archive)
        if not a.report_only:
            if any(s < 0 for s in a.seeds):
                raise SystemExit("--seeds takes non-negative integers")
            todo = []
            for seed in dict.fromkeys(a.seeds):
                for name in a.only or self.planned.get(model, list(self.variants)):
                    if self._final(out, model, name, epochs, seed) is None:  # unfinished here and in the archive
                        todo.append((name, seed))
            threads = a.threads or (max(1, (os.cpu_count() or 1) // a.jobs) if a.jobs > 1 else None)
            cmds = {t: self.train_command(*t, model=model, epochs=epochs, out=out, data_dir=a.data_dir,
                                          threads=threads) for t in todo}
            if a.jobs == 1:
                for (name, seed), cmd in cmds.items():
                    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
                    subprocess.run(cmd, check=True)
                    self.archive_run(out, model, name, epochs, seed)
                    self.report(out, model, epochs, report)
            else:
                self._run_parallel(cmds, a.jobs, model, epochs, out, report)
        print(self.report(out, model, epochs, report))
        return 0

    def _run_parallel(self, cmds: dict[tuple[str, int], list[str]], jobs: int, model: str, epochs: int, out: Path,
                      report: Path) -> None:
        """Train up to ``jobs`` variants at once; a failed run stops the matrix after the others end."""
        out.mkdir(parents=True, exist_ok=True)
        pending, running, failed = list(cmds), {}, []
        while pending or running:
            while pending and len(running) < jobs and not failed:
                key = pending.pop(0)
                log = open(out / f"{self.run_name(model, *key)}.log", "a")
                print("+", " ".join(shlex.quote(c) for c in cmds[key]), f"> {log.name}", flush=True)
                running[key] = (subprocess.Popen(cmds[key], stdout=log, stderr=subprocess.STDOUT), log)
            if failed and not running:
                break
            time.sleep(2)
            for key, (proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[key]
                run = self.run_name(model, *key)
                if proc.returncode != 0:
                    failed.append(run)
                    print(f"! {run} failed (exit {proc.returncode}); see {log.name}", flush=True)
                    continue
                self.archive_run(out, model, key[0], epochs, key[1])
                self.report(out, model, epochs, report)
                print(f"= {run} finished", flush=True)
        if failed:
            raise SystemExit(f"training failed for {', '.join(failed)}")

    def train_command(self, name: str, seed: int = 0, *, model: str, epochs: int, out: Path, data_dir: str | None,
                      threads: int | None = None) -> list[str]:
        """The command the runner executes: the row's command plus where runs and data live (and threads)."""
        cmd = [*self.command(name, model, epochs, seed), "--out-dir", str(out), "--resume", "auto", "--progress", "off"]
        if data_dir:
            cmd += ["--data-dir", data_dir]
        if threads:
            cmd += ["--threads", str(threads)]
        return cmd


def _portable(text: str, out_dir: Path) -> str:
    """``text`` without this machine's absolute paths (the archive is committed): the runs folder becomes
    ``OUT_DIR``, the repository (the working directory) ``.`` and the home folder ``~``."""
    repo = Path.cwd().resolve()
    for path, name in ((Path(out_dir).resolve(), "OUT_DIR"), (repo, "."), (Path.home(), "~")):
        if path != Path(path.anchor):  # never the file-system root: every path would change
            text = text.replace(str(path), name)
    return text


def read_rows(d: Path) -> list[dict]:
    f = d / "metrics.csv"
    if not f.exists():
        return []
    with open(f) as fh:
        return list(csv.DictReader(fh))
