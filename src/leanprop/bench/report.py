"""JSONL benchmark records -> ``docs/benchmarks.md`` tables and PNG plots (generated; do not edit by hand).

    leanprop report                        # from benchmarks/results/*.jsonl; plots into docs/img/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

from leanprop.bench.report_capacity import (
    filter_floor_section,
    kept_by_module_section,
    max_batch_records,
    max_batch_section,
    write_max_batch_plot,
)
from leanprop.bench.report_modes import device_of, gpu_memory_rows, modes_section
from leanprop.bench.report_tables import latest as _latest
from leanprop.bench.report_tables import malloc_settings, malloc_tag, method_rank, pyplot, save_fig
from leanprop.bench.report_tables import markdown_table as _table

__all__ = ["read_records", "render", "write_report", "write_plots", "main"]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_records(results_dir: Path) -> list[dict]:
    recs = []
    for f in sorted(results_dir.glob("*.jsonl")):
        for i, line in enumerate(f.read_text().splitlines()):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{i + 1}: not valid JSON ({e}); fix or delete that line") from e
    return recs


_METHOD_ORDER = ("dense", "checkpoint", "blpa8", "blpa4", "blpa2", "swat-u90", "swat-u80-packed", "swat-u90-packed",
                 "swat-u95-packed", "swat-erk90-packed")


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _memory_section(recs: list[dict]) -> list[str]:
    """"Memory kept for backward" from ``bench == "memory"`` records (benchmarks/blpa_memory.py,
    ``leanprop bench memory --jsonl``)."""
    mem = _latest([r for r in recs if r.get("bench") == "memory" and "saved_bytes" in r],
                  ("model", "model_kwargs", "input_shape", "batch", "method", "device", "dtype", "threads",
                   "processor"))
    if not mem:
        return []
    parts = ["## Memory kept for backward", "",
             "Kept: bytes autograd keeps for backward after one training-mode forward pass (saved-tensor audit, "
             "deduplicated by storage, parameters and buffers excluded); vs dense: against the dense record of "
             "the same invocation. Peak: one training step (forward, cross-entropy, backward; after a warm-up "
             "step) in a fresh process, peak RSS on CPU (max allocated on CUDA); growth = peak minus the RSS "
             "just before the forward. Command: `leanprop bench blpa_memory`. Target: "
             "BLPA-4 keeps >= 14x less than dense on pre-activation ResNet-164. `swat-*`: SWAT with the "
             "paper's arithmetic (W_s kept as the Parameter + a 1-bit mask, X_s as X itself -- usually the "
             "ReLU's saved output -- plus its threshold, masked in the backward; records from before git 5a599a7 "
             "kept both as extra zero-filled copies); `swat-*-packed`: `SWATConfig(compress_saved=True)` (X_s as "
             "values + 1-bit mask, 1-bit ReLU masks; exact gradients; BatchNorm inputs stay dense fp32 as SWAT "
             "specifies). Target: packed SWAT-U90 <= 1/3 of dense "
             "on ResNet-18 (CIFAR) and ResNet-50.", ""]

    def order(r: dict) -> tuple:
        m = r["method"]
        return (r["model"], r["batch"], str(r.get("input_shape")), r.get("device", ""),
                _METHOD_ORDER.index(m) if m in _METHOD_ORDER else len(_METHOD_ORDER), m)

    rows = []
    for r in sorted(mem, key=order):
        ratio = r.get("ratio_vs_dense")
        vs = "-" if ratio is None else f"{ratio:.3f}" + (f" (1/{1 / ratio:.1f})" if ratio > 0 else "")
        mb = r.get("max_batch")
        cap = r.get("mem_cap_bytes")
        opts = ",".join(f"{k}={v}" for k, v in (r.get("model_kwargs") or {}).items())
        rows.append([r["model"] + (f" ({opts})" if opts else ""), str(r["batch"]), r["method"],
                     _mib(r["saved_bytes"]), vs,
                     _mib(r.get("peak_bytes")), _mib(r.get("step_peak_growth_bytes")),
                     "-" if mb is None else f"{mb} (cap {cap / 2**30:.2f} GiB)", r.get("device", "?"),
                     r.get("allocator", "?"), r.get("git_sha") or "?"])
    parts += [_table(["model", "batch", "method", "kept MiB", "vs dense", "peak MiB", "growth MiB",
                      "max batch", "device", "allocator", "git"], rows), ""]
    return parts


def _sparse_kernels_section(recs: list[dict]) -> list[str]:
    """Sparse (CSR) against dense kernels per GEMM (``benchmarks/sparse_kernels.py``) and the break-even."""
    sk = _latest([{"format": "csr", **r} for r in recs if r.get("bench") == "sparse_kernels"
                  and r.get("format", "csr") in ("csr", "coo")],
                 ("layer", "op", "format", "sparsity", "batch", "threads", "processor"))
    if not sk:
        return []
    sps = sorted({r["sparsity"] for r in sk})
    parts = ["## Unstructured sparse kernels against dense (per GEMM)", "",
             "CSR / COO SpMM on im2col (`torch.sparse.mm`), including im2col/col2im and the dense->sparse conversion a "
             "real sparse path pays every step, against oneDNN on the zero-filled tensors; ratio = sparse time / "
             "dense time (below 1: sparse wins). Break-even: the lowest measured sparsity at which sparse wins. "
             "Command: `leanprop bench kernels`. A SWAT layer uses a sparse kernel only for an op "
             "where it measured faster on the running machine: with `sparse_kernels=\"auto\"` (the default) the "
             "dense kernel and both sparse formats are timed for every layer at its real shapes before the first "
             "training step "
             "(`leanprop.swat.sparse_kernels`); the matrix tables say what was chosen.", ""]
    rows = []
    def row_key(r: dict) -> tuple:
        return r["layer"], r["op"], r["format"], r["batch"], r["threads"]

    for key in dict.fromkeys(row_key(r) for r in sk):
        cell = {r["sparsity"]: r for r in sk if row_key(r) == key}
        wins = [s for s in sps if s in cell and cell[s]["ratio"] < 1]
        layer, op, fmt, batch, threads = key
        rows.append([layer, op, fmt, str(batch), str(threads),
                     *[f"{cell[s]['ratio']:.2f}" if s in cell else "" for s in sps],
                     f"{min(wins):.0%}" if wins else f"none up to {max(cell):.0%}"])
    parts += [_table(["layer", "op", "format", "batch", "threads", *[f"{s:.0%}" for s in sps], "break-even"],
                     rows), ""]
    return parts


def _direct_kernels_section(recs: list[dict]) -> list[str]:
    """The direct sparse kernel against oneDNN and SparseProp per layer (``leanprop bench kernels``)."""
    sk = _latest([r for r in recs if r.get("bench") == "sparse_kernels"
                  and r.get("format") in ("direct", "pointwise", "rows", "sparseprop")],
                 ("layer", "op", "format", "sparsity", "batch", "threads", "processor"))
    if not sk:
        return []
    cell = {(r["layer"], r["sparsity"], r["batch"], r["threads"], r["op"], r["format"]): r for r in sk}
    keys = list(dict.fromkeys((r["layer"], r["sparsity"], r["batch"], r["threads"]) for r in sk))
    if any(r["format"] == "sparseprop" for r in sk):  # the side-by-side cells; a sparsity sweep is the break-even's
        keys = [k for k in keys if (*k, "forward+backward", "sparseprop") in cell]
    rows, wins, compared = [], {}, {}  # per batch
    for key in keys:
        # the fastest compiled kernel of this layer's forward + input gradient (pointwise: 1x1 convs; rows: k×k,
        # stride 1)
        kern = min((f for f in ("direct", "pointwise", "rows") if (*key, "forward+grad_input", f) in cell),
                   default=None, key=lambda f: cell[(*key, "forward+grad_input", f)]["sparse_ms"])
        if kern is None:
            continue
        both = cell[(*key, "forward+grad_input", kern)]
        sp = cell.get((*key, "forward+backward", "sparseprop"))
        fwd, dx = cell.get((*key, "forward", kern)), cell.get((*key, "grad_input", kern))
        dw, layer = cell.get((*key, "grad_weight", "direct")), cell.get((*key, "layer", kern))
        ratio = "" if sp is None else f"{both['sparse_ms'] / sp['sparse_ms']:.2f}"
        if sp is not None:
            compared[key[2]] = compared.get(key[2], 0) + 1
            wins[key[2]] = wins.get(key[2], 0) + (both["sparse_ms"] <= sp["sparse_ms"])
        rows.append([key[0] + ("" if kern == "direct" else f" ({kern})"), f"{key[1]:.0%}", str(key[2]), str(key[3]),
                     f"{both['dense_ms']:.2f}",
                     f"{both['sparse_ms']:.2f} ({both['ratio']:.2f}x)",
                     "" if fwd is None else f"{fwd['ratio']:.2f}x", "" if dx is None else f"{dx['ratio']:.2f}x",
                     "" if sp is None else f"{sp['sparse_ms']:.2f} ({sp['ratio']:.2f}x)", ratio,
                     "" if dw is None else f"{dw['ratio']:.2f}x", "" if layer is None else f"{layer['ratio']:.2f}x"])
    parts = ["## Sparse convolution kernels against oneDNN and SparseProp (per layer)", "",
             "Forward + input gradient of one SWAT conv on CIFAR ResNet-18's shapes (and ResNet-50's at batch 8), "
             "the weight at the given sparsity. dense: oneDNN on the zero-filled weight. library: the fastest of the "
             "compiled kernels of `leanprop.ops.sparse_conv` (weight in CSR rebuilt every call, any layout change "
             "in and out counted): direct (batch-innermost) unless the layer is marked. SparseProp: its forward + "
             "backward (the backward also computes the gradient of the kept weights; its weight is converted once, "
             "its output stays in its own layout). A layer marked (pointwise) or (rows) shows that kernel, where it "
             "beats the direct one: the pointwise kernel takes a 1x1 conv in its NCHW layout, no layout change; the "
             "rows kernel a k×k stride-1 conv in NCHW with the padded rows innermost (X padded, the output cropped, "
             "both counted). direct dW: SWAT's dense weight "
             "gradient from the kept 10 or 5 % "
             "of X (read from the dense X with its threshold), against oneDNN's on the zero-filled X_s; layer: "
             "forward, input and weight gradient together, direct against oneDNN. "
             "Command: `leanprop bench kernels`.", "",
             _table(["layer", "sparsity", "batch", "threads", "dense fwd+dX ms", "library fwd+dX ms",
                     "library fwd", "library dX", "SparseProp fwd+bwd ms", "library / SparseProp", "direct dW",
                     "library layer"], rows), ""]
    if compared:
        per = "; ".join(f"{wins[b]} of {compared[b]} layer x sparsity cells at batch {b}" for b in compared)
        parts += [f"The library's forward + input gradient is at least as fast as SparseProp's forward + "
                  f"backward on {per}.", ""]
    return parts + _direct_break_even(sk)


def _direct_break_even(sk: list[dict]) -> list[str]:
    """Where the direct kernel pays: one SWAT layer's three ops, direct / dense, per layer, threads and sparsity."""
    lay = [r for r in sk if r["op"] == "layer" and r["format"] in ("direct", "pointwise", "rows")]
    if not lay:
        return []
    sps = sorted({r["sparsity"] for r in lay})
    cell = {}
    for r in lay:  # the faster compiled kernel of each cell
        k = (r["layer"], r["batch"], r["threads"], r["sparsity"])
        if k not in cell or r["ratio"] < cell[k]["ratio"]:
            cell[k] = r
    rows = []
    for key in dict.fromkeys((r["layer"], r["batch"], r["threads"]) for r in lay):
        got = {s: cell[(*key, s)]["ratio"] for s in sps if (*key, s) in cell}
        wins = [s for s in got if all(got[t] < 1 for t in got if t >= s)]  # wins here and at every higher one
        rows.append([key[0], str(key[1]), str(key[2]), *[f"{got[s]:.2f}" if s in got else "" for s in sps],
                     f"{min(wins):.0%}" if wins else f"none up to {max(got):.0%}"])
    return ["### Break-even of the direct kernel (one SWAT layer)", "",
            "Forward + input gradient + weight gradient of one SWAT conv (weight and X_s at the given sparsity) by "
            "the direct kernel (forward and input gradient by the pointwise or the rows kernel where that is "
            "faster), over the same three ops on oneDNN; below 1 the sparse layer is faster. Break-even: "
            "the lowest measured sparsity from which it wins at every higher one. Command: `leanprop bench kernels "
            "--sparsities ... --threads ...`.", "",
            _table(["layer", "batch", "threads", *[f"{s:.0%}" for s in sps], "break-even"], rows), ""]


def _blpa_grad_error_section(recs: list[dict]) -> list[str]:
    """BLPA's gradients against exact ones, part by part (``leanprop bench blpa_grad_error``)."""
    ge = _latest([{"on": "dense", **r} for r in recs if r.get("bench") == "blpa_grad_error"],
                 ("model", "state", "on", "variant", "processor"))
    if not ge:
        return []
    ge.sort(key=lambda r: (r["model"], r["state"], r["on"]))  # stable: variants keep their measured order
    rows = [[r["model"], r["state"], r["on"], r["variant"] if r["on"] == "dense" else f"{r['on']}+{r['variant']}",
             str(r["batches"]), f"{r['cos']:.4f}", f"{r['cos_min']:.4f}", f"{r['rel_err']:.3f}", f"{r['drift']:.3f}",
             r.get("git_sha") or "?"] for r in ge]
    return ["## BLPA gradient error by part", "",
            "The gradient of every parameter under each BLPA variant against the exact gradient of the same model "
            "on the same CIFAR-10 training batch (fp32, train mode). cos: mean cosine over the batches (worst in "
            "the next column); rel. error: mean |g - g_exact| / |g_exact|; drift: |mean (g - g_exact)| / mean "
            "|g_exact| over the batches, the part of the error that does not average out. Variants: `units` the BN "
            "codes only (the paper's scope), `sr` stochastic rounding, `bn8` the BN codes at 8 bits and the rest "
            "at 4. `against`: the reference gradient, `dense` the exact one; another method (e.g. `swat-u90`) "
            "means the variant runs on top of it and is compared with that method alone, which is the distance "
            "BLPA adds there. Command: `leanprop bench blpa_grad_error [--checkpoint ...] [--on METHOD]`.", "",
            _table(["model", "state", "against", "variant", "batches", "cos", "worst cos", "rel. error", "drift",
                    "git"], rows),
            ""]


def _packing_section(recs: list[dict]) -> list[str]:
    """Bits per element of SWAT's packed ``X_s`` (``benchmarks/swat_packing.py``)."""
    pk = _latest([r for r in recs if r.get("bench") == "swat_packing"],
                 ("shape", "dtype", "density", "threads", "processor"))
    if not pk:
        return []
    rows = [[str(tuple(r["shape"])), r["dtype"], f"{r['density']:.0%}", f"{r['bits_per_element']:.3f}",
             f"{r['formula_bits']:.3f}", r["positions"], f"{r['kept_bytes'] / r['dense_bytes']:.4f}",
             f"{r['pack_ms']:.2f}", f"{r['unpack_ms']:.2f}", str(r["threads"]), r.get("git_sha") or "?"]
            for r in pk]
    return ["## Packed X_s: bits per element", "",
            "What `compress_saved=True` really keeps for one SWAT layer input (post-ReLU activations, ResNet-18-"
            "CIFAR shapes at batch 128): positions (a 1-bit mask, or int32 indices where those are smaller) + the "
            "kept values + the packer's chunk offsets, in bits per element of the dense tensor; formula: "
            "value bits x kept + 1 (the mask form). Expected: about 4.2 bits at 90 % sparsity in fp32. "
            "Command: `leanprop bench swat_packing`.", "",
            _table(["tensor", "dtype", "kept", "bits/element", "formula", "positions", "x dense bytes",
                    "pack ms", "unpack ms", "threads", "git"], rows), ""]


def _matrix_records(recs: list[dict]) -> list[dict]:
    """The newest matrix record per (model, method, batch, input shape, threads, dtype, layout, compiled, device,
    machine), with ``other_machine``: its CPU's name when that is not :func:`_main_processor`'s, else empty."""
    found = [{**r, "compile": bool(r.get("compile")), "malloc_settings": malloc_settings(r)}
             for r in recs if r.get("bench") == "matrix" and "step_s" in r]
    latest = _latest(found, ("model", "method", "batch", "input_shape", "threads", "dtype", "channels_last",
                             "compile", "device", "processor", "gpu", "malloc_settings"))
    main = _main_processor(latest)
    return [{**r, "other_machine": "" if device_of(r) != "cpu" or str(r.get("processor")) == main
             else str(r.get("processor"))} for r in latest]


def _main_processor(mx: list[dict]) -> str | None:
    """The CPU that ran most of the CPU matrix records: its tables carry no machine name; another CPU's records
    get tables of their own, named after it, so that no table mixes machines (step ratios differ by CPU)."""
    counts = Counter(str(r.get("processor")) for r in mx if device_of(r) == "cpu")
    return max(counts, key=lambda p: (counts[p], p)) if counts else None


def _eager_step(mx: list[dict], r: dict) -> float | None:
    """The eager step seconds for the compiled record ``r``: its own run's interleaved eager steps when it holds
    them, else the newest eager record of the same settings (None when there is none)."""
    if r.get("eager_step_s"):
        return r["eager_step_s"]
    key = ("model", "method", "batch", "input_shape", "threads", "dtype", "channels_last", "processor", "gpu",
           "malloc_settings")
    found = [e for e in mx if not e["compile"] and device_of(e) == device_of(r)
             and all(str(e.get(k)) == str(r.get(k)) for k in key)]
    return found[-1]["step_s"] if found else None


def _env(r: dict, key: str) -> object:
    """A record's environment field, flat or under ``env`` (scripts that nest it), else ``?``."""
    return r.get(key, r.get("env", {}).get(key, "?"))


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


MATRIX_INTRO = (
    "`leanprop bench matrix` (defaults: the models and methods below; CIFAR batch 128, ImageNet-shape "
    "batch 8, fp32). Step: one training step (forward, cross-entropy, backward, SGD step, controller "
    "step) of each method, interleaved round by round in one process, median; x dense = step time / the "
    "dense step of the same run (lower is faster). Kept: bytes kept for backward (saved-tensor audit). "
    "Peak growth: one step in a fresh process, peak minus the memory before the forward. FLOPs: counted "
    "conv/linear training MACs / dense. Max batch: the largest batch whose fresh-process peak fits the cap "
    "(when measured). Compiled tables (`--compile`: the model under `torch.compile`, warm-up steps absorb the "
    "compilation): x eager = compiled step / the same model's eager step, interleaved in the same run (older "
    "records: the newest eager record of the same settings); "
    "graph breaks: those Dynamo found while compiling this method's steps; a method whose model reuses graphs "
    "compiled for an earlier method of the same classes finds none and shows 0 (per-method counts with a fresh "
    "cache: \"Execution modes\"); kept bytes and peaks are the eager audits.")


def _matrix_section(recs: list[dict], plots: dict[str, str], device: str = "cpu",
                    heading: str = "## Every method on every model") -> list[str]:
    """"Every method on every model" from ``bench == "matrix"`` records (``leanprop bench matrix``) of one device
    type, one table per model, layout and compiled/eager."""
    everything = _matrix_records(recs)
    mx = [r for r in everything if device_of(r) == device]
    if not mx:
        return []
    parts = [heading, "", MATRIX_INTRO, ""]
    sub = heading.split(" ", 1)[0] + "#"  # one level below the heading
    for model in dict.fromkeys(_group(r) for r in mx):
        rows = _model_rows(mx, model)
        r0 = rows[0]
        parts += [f"{sub} {_label(r0)} (batch {r0['batch']}, {r0.get('threads')} threads, {r0.get('dtype', 'fp32')}, "
                  f"{r0.get('gpu') or r0.get('device', 'cpu')}, git {r0.get('git_sha') or '?'})", ""]
        table = []
        for r in rows:
            mb = r.get("max_batch")
            cap = r.get("mem_cap_bytes")
            row = [r["method"], f"{r['step_s'] * 1000:.1f}", f"{r['time_vs_dense']:.3f}"]
            if r0["compile"]:
                eager = _eager_step(everything, r)
                row += ["-" if eager is None else f"{r['step_s'] / eager:.3f}", str(r.get("graph_breaks", "-"))]
            table.append([*row, _mib(r.get("saved_bytes")), _fmt(r.get("ratio_vs_dense")),
                          _mib(r.get("step_peak_growth_bytes")), _fmt(r.get("peak_growth_ratio_vs_dense")),
                          _fmt(r.get("train_flops_vs_dense")),
                          "-" if mb is None else f"{mb} ({cap / 2**30:.1f} GiB)",
                          r.get("error", "")[:60]])
        compiled = ["x eager", "graph breaks"] if r0["compile"] else []
        parts += [_table(["method", "step ms", "x dense", *compiled, "kept MiB", "kept x dense", "peak growth MiB",
                          "growth x dense", "train FLOPs x dense", "max batch (cap)", "error"], table), ""]
        kern = [f"{r['method']}: {r['sparse_kernels'].split(': ', 1)[-1]}"
                + (f" (timed in {r['kernel_calibration_s']:.1f} s)" if r.get("kernel_calibration_s") else "")
                for r in rows if r.get("sparse_kernels")]
        if kern:
            parts += ["Kernels chosen by the SWAT layers' calibration (`sparse_kernels=\"auto\"`, timed on this "
                      "batch before the first step): " + "; ".join(kern) + ".", ""]
        for kind in ("time", "memory"):
            if f"{model}:{kind}" in plots:
                parts += [f"![{kind} of {model}]({plots[f'{model}:{kind}']})", ""]
    return parts


_DEFAULT_BATCH = {"cifar": 128, "imagenet": 8}  # `leanprop bench matrix`'s --batch / --imagenet-batch
_DEFAULT_SIZE = {"cifar": 32, "imagenet": 224}  # the family's input size


def _other_size(r: dict) -> int | None:
    """A record's input size when it is not its model family's (None: the family's, or not recorded)."""
    size = (r.get("input_shape") or [None])[-1]
    return None if size in (None, _DEFAULT_SIZE.get(r.get("family", ""), size)) else size


def _group(r: dict) -> str:
    """A matrix table's key: the model, with ``-nhwc`` for channels-last runs, ``-compile`` for compiled ones, the
    device type unless CPU, and the input size, batch, dtype and threads where they are not the matrix's defaults
    (plot file names use it), so that one table never mixes settings."""
    dev = device_of(r)
    batch = r.get("batch")
    threads = r.get("threads")
    size = _other_size(r)
    return (r["model"] + ("-nhwc" if r.get("channels_last") else "") + ("-compile" if r.get("compile") else "")
            + ("" if dev == "cpu" else f"-{dev}") + ("" if size is None else f"-{size}px")
            + ("" if batch == _DEFAULT_BATCH.get(r.get("family", ""), batch) else f"-b{batch}")
            + ("" if r.get("dtype", "fp32") == "fp32" else f"-{r['dtype']}")
            + ("" if threads in (None, r.get("cpu_count")) or dev != "cpu" else f"-{threads}t")
            + malloc_tag(r) + ("-" + re.sub(r"[^a-z0-9]+", "-", r["other_machine"].lower()).strip("-")
                               if r.get("other_machine") else ""))


def _label(r: dict) -> str:
    dev = device_of(r)
    size = _other_size(r)
    return (r["model"] + (" (NHWC)" if r.get("channels_last") else "") + (" (compiled)" if r.get("compile") else "")
            + ("" if size is None else f" at {size}x{size}")
            + ("" if r.get("dtype", "fp32") == "fp32" else f" in {r['dtype']}")
            + ("" if dev == "cpu" else f" on {dev}") + (f" on {r['other_machine']}" if r.get("other_machine") else "")
            + (f", malloc: {malloc_settings(r)}" if malloc_settings(r) else ""))


def _gpu_section(recs: list[dict], plots: dict[str, str]) -> list[str]:
    """"On a CUDA GPU": the CUDA records of the matrix, modes and memory benchmarks (``benchmarks/gpu_check.sh``
    writes them)."""
    matrix = _matrix_section(recs, plots, "cuda", "### Every method on every model")
    modes = modes_section(recs, "cuda", "### Execution modes")
    mem = gpu_memory_rows(recs)
    if not (matrix or modes or mem):
        return []
    gpus = sorted({str(r.get("gpu")) for r in recs if r.get("gpu")})
    parts = ["## On a CUDA GPU", "",
             f"Measured by `benchmarks/gpu_check.sh OUT_DIR` ({', '.join(gpus) or 'GPU not recorded'}); its JSONL "
             "files copied into benchmarks/results/. Memory: `torch.cuda.max_memory_allocated` of one training "
             "step in a fresh process.", ""]
    parts += matrix + modes
    if mem:
        parts += ["### Memory on the GPU", "",
                  _table(["model", "batch", "method", "kept MiB", "kept x dense", "peak MiB (max allocated)", "gpu",
                          "git"], mem), ""]
    return parts


def _model_rows(mx: list[dict], model: str) -> list[dict]:
    """One model's (and layout's, see :func:`_group`) matrix records in the methods' display order."""
    return sorted((r for r in mx if _group(r) == model), key=lambda r: method_rank(r["method"]))


def write_plots(recs: list[dict], out_dir: Path, rel_to: Path) -> dict[str, str]:
    """PNG plots of the matrix records: time vs method and kept memory vs batch, one pair per model.
    Returns ``{"<model>:time"|"<model>:memory": path relative to rel_to}``."""
    mx = _matrix_records(recs)
    if not mx:
        return {}
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for model in dict.fromkeys(_group(r) for r in mx):
        rows = _model_rows(mx, model)
        names = [r["method"] for r in rows]
        fig, ax = plt.subplots(figsize=(8, 3.6))
        vals = [r["time_vs_dense"] for r in rows]
        ax.bar(names, vals, color=["#777" if n == "dense" else "#3a7" if v <= 1 else "#c55"
                                   for n, v in zip(names, vals, strict=True)])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("step time / dense")
        ax.set_title(f"{_label(rows[0])}: training step time by method (batch {rows[0]['batch']})")
        ax.tick_params(axis="x", rotation=35)
        fig.tight_layout()
        path = out_dir / f"matrix_time_{model}.png"
        save_fig(fig, path)
        plt.close(fig)
        written[f"{model}:time"] = os.path.relpath(path, rel_to)
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in rows:
            pts = r.get("kept_vs_batch") or []
            if pts:
                ax.plot([p[0] for p in pts], [p[1] / 2**20 for p in pts], marker="o", label=r["method"])
        ax.set_xlabel("batch")
        ax.set_ylabel("bytes kept for backward (MiB)")
        ax.set_title(f"{_label(rows[0])}: memory kept for backward against batch")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"matrix_memory_{model}.png"
        save_fig(fig, path)
        plt.close(fig)
        written[f"{model}:memory"] = os.path.relpath(path, rel_to)
    return written


def render(recs: list[dict], plots: dict[str, str] | None = None) -> str:
    parts = ["# Benchmarks", "",
             "Generated by `leanprop report` from `benchmarks/results/*.jsonl`; every number below was "
             "written by a committed benchmark command. Do not edit by hand.", ""]
    parts += _matrix_section(recs, plots or {})
    parts += modes_section(recs, "cpu")
    parts += _gpu_section(recs, plots or {})
    tp = _latest([r for r in recs if r.get("bench") == "train_throughput"],
                 ("method", "model", "batch", "threads", "dtype", "channels_last", "processor"))
    if tp:
        parts += ["## Dense training throughput", "",
                  "Full SGD steps (forward, cross-entropy, backward, momentum update) on a fixed batch; median "
                  "of the timed steps. Command: `leanprop bench train_throughput`.", ""]
        rows = [[r["model"], str(r["batch"]), str(r["threads"]), r["dtype"], "NHWC" if r["channels_last"] else "NCHW",
                 f"{r['step_ms_median']:.1f}", f"{r['images_per_s']:.1f}", r.get("allocator", "?"),
                 r.get("torch", "?"), r.get("git_sha") or "?"]
                for r in sorted(tp, key=lambda r: (r["model"], r["threads"], r["dtype"], r["channels_last"]))]
        parts += [_table(["model", "batch", "threads", "dtype", "layout", "ms/step", "images/s", "allocator",
                          "torch", "git"], rows), ""]
    dp = _latest([r for r in recs if r.get("bench") == "data_pipeline"], ("dataset", "threads", "processor"))
    if dp:
        parts += ["## Data pipeline alone", "",
                  "One epoch of the training loader (shuffle, pad-4 random crop + flip on uint8 batches, "
                  "normalize to float32 NCHW), no model.", ""]
        rows = [[r["dataset"], str(r["batch"]), str(r["threads"]), f"{r['images_per_s']:.0f}"] for r in dp]
        parts += [_table(["dataset", "batch", "threads", "images/s"], rows), ""]
    sw = _latest([r for r in recs if r.get("bench") == "swat_speed"],
                 ("model", "method", "topk_period", "threads", "batch", "processor"))
    if sw:
        parts += ["## SWAT step time against dense (emulated sparsity, masked dense kernels)", "",
                  "Dense and SWAT steps interleaved round by round in one process (bs 128, NHWC, fp32); the "
                  "median ratio ignores the exact Top-K steps, the ratio of means amortises them over the "
                  "period. Command: `leanprop bench swat_speed [--topk-period P]`. Target: <= 1.10.", ""]
        rows = [[r["model"], r["method"], str(r["topk_period"]), str(r["threads"]), f"{r['dense_ms']:.1f}",
                 f"{r['swat_ms']:.1f}", f"{r['ratio']:.3f}", f"{r['ratio_mean']:.3f}", str(r["rounds"]),
                 r.get("git_sha") or "?"]
                for r in sorted(sw, key=lambda r: (r["model"], r["topk_period"], r["threads"]))]
        parts += [_table(["model", "method", "period", "threads", "dense ms", "SWAT ms", "ratio (median)",
                          "ratio (mean)", "rounds", "git"], rows), ""]
    parts += _blpa_grad_error_section(recs)
    th = _latest([r for r in recs if r.get("bench") == "swat_threshold"], ("shape", "op", "threads", "processor"))
    if th:
        parts += ["## Top-K threshold and mask cost", "",
                  "Median ms per call on one tensor at 10 % kept. Command: `leanprop bench swat_threshold`.",
                  ""]
        ops = list(dict.fromkeys(r["op"] for r in th))
        keys = list(dict.fromkeys((str(r["shape"]), r["threads"]) for r in th))
        cell = {(str(r["shape"]), r["threads"], r["op"]): r["ms"] for r in th}
        rows = [[shape, str(t)] + [f"{cell[(shape, t, op)]:.1f}" if (shape, t, op) in cell else "" for op in ops]
                for shape, t in keys]
        parts += [_table(["tensor", "threads", *ops], rows), ""]
    parts += _packing_section(recs)
    bs = _latest([r for r in recs if r.get("bench") == "blpa_speed"],
                 ("model", "method", "dtype", "channels_last", "threads", "batch", "processor"))
    if bs:
        parts += ["## BLPA training throughput against dense", "",
                  "Dense and BLPA steps (same weights, shortcut=pad) interleaved round by round in one process, "
                  "bs 128; throughput ratio = median dense step / median BLPA step. Command: "
                  "`leanprop bench blpa_speed`. Target: BLPA-4 >= 0.90.", ""]
        rows = [[r["model"], r["method"], r["dtype"], "NHWC" if r["channels_last"] else "NCHW", str(r["threads"]),
                 f"{r['dense_ms']:.1f}", f"{r['blpa_ms']:.1f}", f"{r['throughput_ratio']:.3f}", r["kernels"],
                 str(r["rounds"]), r.get("git_sha") or "?"]
                for r in sorted(bs, key=lambda r: (r["model"], r["method"], r["dtype"], r["channels_last"]))]
        parts += [_table(["model", "method", "dtype", "layout", "threads", "dense ms", "BLPA ms", "throughput ratio",
                          "kernels", "rounds", "git"], rows), ""]
    parts += max_batch_section(recs, plots or {})
    parts += filter_floor_section(recs)
    parts += _memory_section(recs)
    parts += kept_by_module_section(recs)
    parts += _direct_kernels_section(recs)
    parts += _sparse_kernels_section(recs)
    machines = sorted({f"{_env(r, 'processor')} ({_env(r, 'cpu_count')} CPUs)" for r in recs})
    if machines:
        parts += ["Machines: " + "; ".join(machines) + ".", ""]
    return "\n".join(parts)


HEADLINE_BEGIN, HEADLINE_END = "<!-- report:headline -->", "<!-- /report:headline -->"
HEADLINE_METHODS = ("swat-u90", "swat-u90-packed", "swat-filter70", "blpa4", "swat-u90+blpa4")


def headline(recs: list[dict]) -> str:
    """The README's headline table: a few methods per model (fp32, eager, its largest batch measured), from the
    newest matrix records of the CPU that ran most of them."""
    mx = [r for r in _matrix_records(recs) if device_of(r) == "cpu" and not r["compile"]
          and r.get("dtype", "fp32") == "fp32" and not r["malloc_settings"] and not r["other_machine"]]
    largest = {}
    for r in mx:
        largest[(_label(r), r["method"])] = max(largest.get((_label(r), r["method"]), 0), r["batch"])
    mx = [r for r in mx if r["batch"] == largest[(_label(r), r["method"])]]
    rows = []
    for r in mx:
        if r["method"] in HEADLINE_METHODS:
            rows.append([_label(r), str(r["batch"]), r["method"], _fmt(r.get("ratio_vs_dense")),
                         f"{r['time_vs_dense']:.2f}", _fmt(r.get("train_flops_vs_dense"), ".2f")])
    if not rows:
        return "(no `leanprop bench matrix` records yet)"
    order = {m: i for i, m in enumerate(HEADLINE_METHODS)}
    rows.sort(key=lambda row: (row[0], order[row[2]]))
    sha = sorted({str(r.get("git_sha")) for r in mx})
    return (_table(["model", "batch", "method", "memory kept for backward x dense", "step time x dense",
                    "training FLOPs x dense"], rows)
            + f"\n\nFrom `leanprop bench matrix` (git {', '.join(sha)}), written here by `leanprop report`; "
            "all methods and columns: [docs/benchmarks.md](docs/benchmarks.md)." + _headline_max_batch(recs))


def _headline_max_batch(recs: list[dict]) -> str:
    """One sentence per memory cap: each model's largest batch, dense and the headline methods."""
    mb = max_batch_records(recs)
    out = []
    for cap in sorted({r["mem_cap_bytes"] for r in mb}):
        parts = []
        here = [r for r in mb if r["mem_cap_bytes"] == cap]
        for model, settings in dict.fromkeys((r["model"], r["malloc_settings"]) for r in here):
            cell = {r["method"]: r["max_batch"] for r in here
                    if r["model"] == model and r["malloc_settings"] == settings}
            if "dense" not in cell:
                continue
            shown = [f"{m} {cell[m]} ({cell[m] / cell['dense']:.2f}x)" for m in HEADLINE_METHODS if m in cell]
            name = f"{model} (malloc: {settings})" if settings else model
            parts.append(f"{name}: dense {cell['dense']}" + "".join(f", {x}" for x in shown))
        if parts:
            out.append(f"Largest training batch under {cap / 2**30:g} GiB (fresh-process peak): " + "; ".join(parts)
                       + ".")
    return "".join("\n\n" + line for line in out)


def update_readme(readme: Path, recs: list[dict]) -> bool:
    """Replace the text between the headline markers of ``readme`` (if it has them); True when it did."""
    text = readme.read_text()
    if HEADLINE_BEGIN not in text or HEADLINE_END not in text:
        return False
    head, rest = text.split(HEADLINE_BEGIN, 1)
    _, tail = rest.split(HEADLINE_END, 1)
    _atomic_write(readme, f"{head}{HEADLINE_BEGIN}\n{headline(recs)}\n{HEADLINE_END}{tail}")
    return True


def write_report(results_dir: Path, out: Path, plots_dir: Path | None = None, readme: Path | None = None) -> None:
    """Regenerate ``out`` from the JSONL files of ``results_dir``; matrix plots go to ``plots_dir`` (default:
    ``img/`` beside ``out``); ``readme``: also refresh its headline table (between the report markers)."""
    if not Path(results_dir).is_dir():
        raise FileNotFoundError(f"no benchmark results folder {results_dir}: run a benchmark first (e.g. "
                                "`leanprop bench matrix --quick`) or pass --results DIR")
    recs = read_records(Path(results_dir))
    out = Path(out)
    plots_dir = Path(plots_dir) if plots_dir else out.parent / "img"
    plots = write_plots(recs, plots_dir, out.parent)
    plots.update(write_max_batch_plot(recs, plots_dir, out.parent))
    _atomic_write(out, render(recs, plots))
    if readme is not None:
        update_readme(Path(readme), recs)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="turn benchmark JSONL records into docs/benchmarks.md and PNG plots",
                       description="Regenerate the benchmark report (markdown tables + PNG plots) from the JSONL "
                       "records the benchmarks wrote.")
    p.add_argument("--results", default="benchmarks/results", help="folder of *.jsonl records")
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--plots", help="folder for the PNG plots (default: img/ beside --out)")
    p.add_argument("--readme", default="README.md",
                   help="refresh the headline table between the report markers of this file ('' to skip)")


def main(args: argparse.Namespace) -> int:
    readme = Path(args.readme) if args.readme and Path(args.readme).exists() else None
    write_report(Path(args.results), Path(args.out), Path(args.plots) if args.plots else None, readme)
    print(f"wrote {args.out}" + (f" and the headline of {readme}" if readme else ""))
    return 0
