"""Report sections on execution modes and on the GPU: ``bench == "modes"`` records (``leanprop bench modes``) and
the CUDA records of the matrix and memory benchmarks (``benchmarks/gpu_check.sh``); placed in
``docs/benchmarks.md`` by :mod:`leanprop.bench.report`."""

from __future__ import annotations

from .report_tables import latest as _latest
from .report_tables import markdown_table as _table
from .report_tables import method_rank as _rank

__all__ = ["device_of", "modes_records", "modes_section", "gpu_memory_rows"]


def device_of(r: dict) -> str:
    """A record's device type (``cpu`` when it names none; ``cuda:0`` -> ``cuda``)."""
    return str(r.get("device") or "cpu").split(":")[0]


def modes_records(recs: list[dict], device: str | None = None) -> list[dict]:
    """The newest ``modes`` record per (method, mode, batch, machine), of one device type if given."""
    found = [r for r in recs if r.get("bench") == "modes" and (device is None or device_of(r) == device)]
    return _latest(found, ("model", "method", "mode", "batch", "steps", "processor", "gpu"))


def _cell(r: dict) -> str:
    if "refused" in r:
        return "refused"
    if "error" in r:
        return "error"
    first = (r.get("grad_rel_l2_steps") or [r["grad_rel_l2"]])[0]
    cell = f"{first:.1e} / {r['grad_rel_l2']:.1e} ({r['grad_rel_l2_worst']:.1e})"
    if r.get("compile"):
        cell += f", {r['graph_breaks']} breaks" + (f", {r['recompile_limit_hits']} limit hits"
                                                   if r.get("recompile_limit_hits") else "")
    if r.get("kept_vs_ref") is not None:
        cell += f", kept x{r['kept_vs_ref']:.3f}"
    if r.get("grad_rel_l2_exact") is not None:
        cell += f"; vs exact {r['grad_rel_l2_exact']:.1e} (reference {r['grad_rel_l2_exact_ref']:.1e})"
    return cell


def modes_section(recs: list[dict], device: str = "cpu", heading: str = "## Execution modes") -> list[str]:
    """Per method (rows) and mode (columns): the gradients' relative L2 distance to the mode's reference over a
    few training steps (all parameters; the worst conv/linear weight in brackets), graph breaks under compile;
    refusals and errors listed under the table."""
    mr = modes_records(recs, device)
    if not mr:
        return []
    modes = list(dict.fromkeys(r["mode"] for r in mr))
    refs = {r["mode"]: r["reference"] for r in mr}
    r0 = mr[0]
    parts = [heading, "",
             f"`leanprop bench modes --device {device}`: each method's first {r0.get('steps', '?')} SGD steps "
             f"(batch {r0.get('batch', '?')}, same weights and batch) in a mode against its reference: compiled "
             "against eager in the same dtype, channels-last against contiguous, the rest against eager fp32 on the "
             "CPU. Cell: relative L2 distance of all parameter gradients at the first step / the largest over the "
             "steps, in brackets the worst single conv/linear weight (any step); kept: bytes kept for backward "
             "against the reference's; under `torch.compile` the graph breaks counted by Dynamo. Models: "
             "resnet8 (dense, SWAT), preact_resnet8 (BLPA, SWAT+BLPA), others where `--models` named them. "
             "vs exact (`--exact`): the first step's gradients against plain PyTorch's (dense in the reference "
             "mode), in brackets the reference's own. tests/test_modes.py holds the tolerances."
             + (" Compiled bf16/fp16 with Inductor emulating eager's low-precision roundings "
                "(`emulate_precision_casts`)." if any(r.get("emulate_precision_casts") for r in mr) else ""), ""]
    rows = []
    notes = []
    order = sorted(dict.fromkeys((r.get("model", "?"), r["method"]) for r in mr),
                   key=lambda k: (_rank(k[1]), k[0]))
    for model, method in order:
        cell = {r["mode"]: r for r in mr if r["method"] == method and r.get("model", "?") == model}
        rows.append([method, model, *[_cell(cell[m]) if m in cell else "" for m in modes]])
        notes += [f"{method} ({model}) in {m}: {cell[m].get('refused') or cell[m].get('error')}" for m in modes
                  if m in cell and ("refused" in cell[m] or "error" in cell[m])]
    parts += [_table(["method", "model", *[f"{m} vs {refs[m]}" for m in modes]], rows), ""]
    if notes:
        parts += ["Refused or failed: " + "; ".join(notes) + ".", ""]
    sha = sorted({str(r.get("git_sha")) for r in mr})
    machines = sorted({str(r.get("gpu") or r.get("processor") or "?") for r in mr})
    torches = sorted({str(r.get("torch", "?")) for r in mr})
    parts += [f"torch {', '.join(torches)}; {'; '.join(machines)}; git {', '.join(sha)}.", ""]
    return parts


def gpu_memory_rows(recs: list[dict]) -> list[list[str]]:
    """Rows of the CUDA memory records (``leanprop bench memory --device cuda``): kept bytes and the step's
    ``torch.cuda.max_memory_allocated`` peak."""
    mem = _latest([r for r in recs if r.get("bench") == "memory" and device_of(r) == "cuda" and "saved_bytes" in r],
                  ("model", "batch", "method", "dtype", "gpu"))
    rows = []
    for r in sorted(mem, key=lambda r: (r["model"], r["batch"], _rank(r["method"]))):
        peak = r.get("peak_bytes")
        ratio = r.get("ratio_vs_dense")
        rows.append([r["model"], str(r["batch"]), r["method"], f"{r['saved_bytes'] / 2**20:.1f}",
                     "-" if ratio is None else f"{ratio:.3f}", "-" if peak is None else f"{peak / 2**20:.1f}",
                     r.get("gpu") or "?", r.get("git_sha") or "?"])
    return rows
