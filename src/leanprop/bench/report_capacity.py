"""Report sections on memory capacity: which layers keep the bytes, and the largest batch under a memory cap.

Both read the ``bench == "memory"`` and ``bench == "matrix"`` JSONL records (``leanprop bench memory``,
``leanprop bench blpa_memory``, ``leanprop bench matrix``); :mod:`leanprop.bench.report` places them
in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .report_tables import latest as _latest
from .report_tables import malloc_settings, pyplot, save_fig
from .report_tables import markdown_table as _table
from .report_tables import method_rank as _rank

__all__ = ["filter_floor_section", "kept_by_module_section", "max_batch_records", "max_batch_section",
           "write_max_batch_plot"]


def _memory_like(recs: list[dict]) -> list[dict]:
    """Memory and matrix records with an audit, oldest first (they come from several JSONL files)."""
    found = [r for r in recs if r.get("bench") in ("memory", "matrix") and "saved_bytes" in r]
    return sorted(found, key=lambda r: str(r.get("timestamp", "")))


def kept_by_module_section(recs: list[dict]) -> list[str]:
    """"Where the kept bytes are": per model and method, the bytes kept for backward split by the class of the
    module that saved them (records with ``saved_by_origin``), as fractions of the dense total."""
    rows_in = _latest([r for r in _memory_like(recs) if r.get("saved_by_origin") and r.get("ratio_vs_dense")],
                      ("model", "batch", "method", "device", "dtype"))
    if not rows_in:
        return []
    parts = ["## Where the kept bytes are", "",
             "Bytes kept for backward split by the class of the module that saved them (a storage counts once, "
             "for the module that saved it first: in dense models the ReLU output is also the next conv's input "
             "and shows under ReLU), as a fraction of the dense model's total at the same batch. BatchNorm2d: "
             "the BN inputs (conv outputs), which SWAT keeps dense by its definition (spec swat.md §4.2), so "
             "their share bounds what SWAT alone can save. Command: `leanprop bench blpa_memory "
             "--models M --methods ...` (or `leanprop bench memory`).", ""]
    rows = []
    for r in sorted(rows_in, key=lambda r: (r["model"], r["batch"], _rank(r["method"]))):
        dense_total = r["saved_bytes"] / r["ratio_vs_dense"]
        top = sorted(r["saved_by_origin"].items(), key=lambda kv: -kv[1])
        shown = [f"{name} {b / dense_total:.3f}" for name, b in top[:4]]
        rest = sum(b for _, b in top[4:])
        if rest:
            shown.append(f"others {rest / dense_total:.3f}")
        rows.append([r["model"], str(r["batch"]), r["method"], f"{r['ratio_vs_dense']:.3f}", ", ".join(shown)])
    return parts + [_table(["model", "batch", "method", "kept x dense", "by saving module (x dense total)"], rows),
                    ""]


def max_batch_records(recs: list[dict]) -> list[dict]:
    """Max-batch searches to show: of each (model, method, batch, layout, ...) only the newest matrix record and
    the newest memory record per cap count, so a search made by older code is dropped once a newer record of
    the same kind exists (a newer matrix run without ``--mem-cap`` retires an old matrix search). Searches under
    different allocator settings are kept apart."""
    key = ("model", "method", "batch", "device", "dtype", "channels_last", "malloc_settings")
    recs = [{**r, "malloc_settings": malloc_settings(r)} for r in recs]
    newest = (_latest([r for r in recs if r.get("bench") == "matrix" and "step_s" in r], key)
              + _latest([r for r in recs if r.get("bench") == "memory" and "saved_bytes" in r],
                        (*key, "mem_cap_bytes")))
    return [r for r in newest if r.get("max_batch") is not None]


def max_batch_section(recs: list[dict], plots: dict[str, str]) -> list[str]:
    """"Largest batch under a memory cap": per cap and model, each method's largest fitting batch and its ratio
    to dense's."""
    mb = max_batch_records(recs)
    if not mb:
        return []
    parts = ["## Largest batch under a memory cap", "",
             "The largest batch whose one training step (forward, cross-entropy, backward, after a warm-up step) "
             "peaks under the cap in a fresh process (peak RSS on CPU, max allocated on CUDA): doubling/halving "
             "from a guess, then binary search; with a tolerance the true largest batch lies in [max batch, first "
             "failing batch). Command: `leanprop bench blpa_memory --models M --methods ... --mem-cap 4GiB "
             "--max-batch-tolerance 0.02` (or `leanprop bench memory --mem-cap 4GiB`). Allocator "
             "`system, mmap threshold 256 KiB`: glibc malloc with `--malloc-mmap-threshold 256KiB` for every method "
             "of the row's search, so memory freed during the step leaves the resident set (`leanprop.allocator`).",
             ""]
    for cap in sorted({r["mem_cap_bytes"] for r in mb}):
        group = [r for r in mb if r["mem_cap_bytes"] == cap]
        rows = []
        for model, settings in dict.fromkeys((r["model"], r["malloc_settings"]) for r in group):
            mine = sorted((r for r in group if r["model"] == model and r["malloc_settings"] == settings),
                          key=lambda r: _rank(r["method"]))
            dense = next((r["max_batch"] for r in mine if r["method"] == "dense"), None)
            for r in mine:
                fails = r.get("max_batch_fails")
                rows.append([model, r["method"], str(r["max_batch"]) + ("+" if r.get("max_batch_hit_limit") else ""),
                             "-" if fails is None else str(fails),
                             f"{r['max_batch'] / dense:.2f}" if dense else "-", r.get("device", "?"),
                             r.get("dtype", "fp32"), r.get("allocator", "?"), r.get("git_sha") or "?"])
        parts += [f"### Cap {cap / 2**30:.2f} GiB", "",
                  _table(["model", "method", "max batch", "first failing batch", "x dense", "device", "dtype",
                          "allocator", "git"], rows), ""]
        if f"max_batch:{cap}" in plots:
            parts += [f"![largest batch under {cap / 2**30:.2f} GiB]({plots[f'max_batch:{cap}']})", ""]
    return parts


def _plot_label(r: dict) -> str:
    """The model's name, with its glibc malloc settings on a second line when it has some."""
    return f"{r['model']}\n({r['malloc_settings']})" if r["malloc_settings"] else r["model"]


def write_max_batch_plot(recs: list[dict], out_dir: Path, rel_to: Path) -> dict[str, str]:
    """One grouped bar chart per cap (models side by side, one bar per method: the largest batch as a multiple
    of dense's, labelled with the batch itself).
    Returns ``{"max_batch:<cap bytes>": path relative to rel_to}``."""
    mb = max_batch_records(recs)
    if not mb:
        return {}
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for cap in sorted({r["mem_cap_bytes"] for r in mb}):
        group = [r for r in mb if r["mem_cap_bytes"] == cap]
        model_names = list(dict.fromkeys(_plot_label(r) for r in group))
        methods = sorted({r["method"] for r in group}, key=_rank)
        cell = {(_plot_label(r), r["method"]): r["max_batch"] for r in group}
        dense = {m: cell.get((m, "dense")) or None for m in model_names}
        width = 0.8 / len(methods)
        fig, ax = plt.subplots(figsize=(max(7.5, 1.8 * len(model_names) + 3.5), 4))
        for j, method in enumerate(methods):
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(model_names))]
            vals = [cell[(m, method)] / dense[m] if (m, method) in cell and dense[m] else 0 for m in model_names]
            bars = ax.bar(xs, vals, width, label=method)
            for bar, m in zip(bars, model_names, strict=True):
                if (m, method) in cell and dense[m]:
                    ax.annotate(str(cell[(m, method)]), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=6, rotation=90)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(model_names)), model_names)
        ax.set_ylabel("largest batch / dense's (label: batch)")
        ax.set_title(f"Largest training batch under {cap / 2**30:.2f} GiB")
        ax.set_ylim(0, 1.15 * max([1.0, *(b.get_height() for b in ax.patches)]))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"max_batch_{cap / 2**30:g}GiB.png"
        save_fig(fig, path)
        plt.close(fig)
        written[f"max_batch:{cap}"] = os.path.relpath(path, rel_to)
    return written


def filter_floor_section(recs: list[dict]) -> list[str]:
    """"Filter-structured SWAT: how fast it could be" from ``bench == "swat_filter_floor"`` records
    (``leanprop bench swat_filter_floor``)."""
    fl = _latest([{**r, "channels_last": bool(r.get("channels_last"))} for r in recs
                  if r.get("bench") == "swat_filter_floor"],
                 ("model", "batch", "sparsity", "period", "threads", "channels_last", "processor"))
    if not fl:
        return []
    parts = ["## Filter-structured SWAT: how fast it could be", "",
             "Per conv layer at its real shapes, the dense forward / input gradient / weight gradient and the same "
             "with only the kept filters (oneDNN kernels alone, median of interleaved repeats); whole training "
             "steps of dense and filter SWAT interleaved in the same run. Non-conv: dense step minus its conv "
             "time (BN, ReLU, adds, pooling, loss, optimizer). Floor: the step ratio filter SWAT would reach if "
             "gathering/scattering the kept channels, Top-K masks and the controller cost nothing -- kept forward "
             "+ kept input gradient + the *dense* weight gradient (the paper's semantics) + non-conv; periodic "
             "floor: the weight gradient of the kept filters, plus the dense one every P-th step. "
             "Targets: <= 0.65 (paper's semantics), <= 0.45 (periodic). Command: "
             "`leanprop bench swat_filter_floor`.", ""]
    rows = [[r["model"], "NHWC" if r.get("channels_last") else "NCHW", str(r["batch"]), f"{r['sparsity']:.2f}",
             str(r["period"]), str(r["threads"]),
             f"{r['dense_step_ms']:.0f}", f"{r['other_share']:.3f}", f"{r['wgrad_share']:.3f}", f"{r['floor']:.3f}",
             f"{r['measured']:.3f}", f"{r['floor_periodic']:.3f}", f"{r['measured_periodic']:.3f}",
             r.get("git_sha") or "?"]
            for r in sorted(fl, key=lambda r: (r["model"], bool(r.get("channels_last")), r["sparsity"]))]
    return parts + [_table(["model", "layout", "batch", "sparsity", "P", "threads", "dense step ms", "non-conv share",
                            "dense wgrad share", "floor", "measured", "periodic floor", "measured periodic", "git"],
                           rows), ""]
