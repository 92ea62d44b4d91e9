"""The one object that drives SWAT during training: Top-K period, exact-Top-K epochs, SWAT-M budgets.

Call order per iteration (as in the official training loop; docs/methods/swat.md, 'How to use'): forward,
backward, ``optimizer.step()``, ``controller.step()``.
``on_epoch_start(epoch)`` before each epoch; with ``sparse_kernels="auto"``, ``calibrate_kernels(x)`` once
before the first step (the trainer does). Its ``state_dict()`` holds everything SWAT adds to a run
(step, epoch, budgets, thresholds, measured densities, SWAT-M state), so resume is bit-identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanprop.methods import Controller
from leanprop.ops.autocast import autocast_dtype
from leanprop.swat import sparse_kernels as sk
from leanprop.swat.config import SWATConfig
from leanprop.timing import time_calls
from leanprop.utils import atomic_write_text


class SWATController(Controller):
    """SWAT's :class:`~leanprop.methods.Controller` (module docstring)."""

    name = "swat"
    flops_basis = "from the SWAT budgets (forward·d_w + grad-input·d_w + grad-weight·d_a)"

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], cfg: SWATConfig, budget: dict[str, float],
                 measure_every: int = 50):
        self.model = model
        self.layers = layers
        self.cfg = cfg
        self.budget = dict(budget)
        self.measure_every = measure_every
        self.step_count = 0
        self.epoch = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.momentum = None
        if cfg.distribution == "momentum":
            from leanprop.swat.budget import collect_layers
            from leanprop.swat.momentum import MomentumRedistributor

            specs = [s for s in collect_layers(model) if s.name in layers]
            self.momentum = MomentumRedistributor(specs, cfg)
        self.kernel_timings: list[sk.KernelTiming] | None = None
        self.kernel_sparsity: dict[str, float] = {}  # each layer's sparsity when its kernels were timed
        self.kernel_cost_ms = 0.0  # what the last calibration took, its capturing forward included
        if cfg.sparse_kernels == "always":
            for layer in layers.values():
                layer.sparse_ops = ("csr",) * 3 if sk.eligible(layer) is None else sk.NO_SPARSE
        self._set_flags()

    # ---------------------------------------------------------------- kernels
    @property
    def needs_kernel_calibration(self) -> bool:
        """``sparse_kernels="auto"`` and some layer could use a sparse kernel, and either nothing is timed yet or
        a layer's sparsity moved by more than 0.05 since (SWAT-M budgets): the choice is made again then."""
        if self.cfg.sparse_kernels != "auto":
            return False
        if self.kernel_timings is not None and not any(  # (the per-step case: a drift check only)
                abs(layer.sparsity - self.kernel_sparsity.get(name, layer.sparsity)) > 0.05
                for name, layer in self.layers.items()):
            return False
        return any(sk.eligible(layer) is None for layer in self.layers.values())

    def calibrate_kernels(self, example_input: torch.Tensor, *, reps: int = 1, margin: float = 0.05,
                          progress: Callable[[str], None] | None = None,
                          timer: Callable | None = None) -> list[sk.KernelTiming]:
        """Choose each unstructured layer's kernels by measurement (``SWATConfig.sparse_kernels="auto"``).

        One no-grad forward of ``example_input`` (in eval mode, so BN running statistics are untouched) records
        every eligible layer's input; :func:`leanprop.swat.sparse_kernels.calibrate` then times the dense and
        each sparse kernel (direct, CSR, COO) of its forward, grad-input and grad-weight and sets ``layer.sparse_ops``,
        spending at most 2 × the dense time of the layers' ops (:class:`leanprop.swat.sparse_kernels.Budget`) besides
        the capturing forward.
        Call it inside the autocast context of training (the kernels are timed in its dtype). Returns the
        timings (also kept as ``self.kernel_timings``; :func:`leanprop.swat.sparse_kernels.format_table` prints
        them)."""
        captured: dict[str, torch.Tensor] = {}

        def hook(name):
            return lambda _m, args: captured.__setitem__(name, args[0].detach())

        handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in self.layers.items()
                   if sk.eligible(layer) is None]
        was_training = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                capture_ms = 1e3 * time_calls(lambda: self.model(example_input), reps=1)[0]
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        dev = example_input.device.type
        dtype = autocast_dtype(dev)
        with torch.autocast(dev, enabled=False) if dtype is not None else contextlib.nullcontext():
            budget = sk.Budget()
            if timer is None:  # the capturing forward is part of the cost
                budget.spend(capture_ms)
            self.kernel_timings = sk.calibrate(self.layers, captured, dtype=dtype, reps=reps, margin=margin,
                                               timer=timer, progress=progress, budget=budget)
            self.kernel_cost_ms = budget.spent_ms
        self._adopt_rank0_kernels()
        self.kernel_sparsity = {name: layer.sparsity for name, layer in self.layers.items()}
        return self.kernel_timings

    @property
    def needs_prepare(self) -> bool:
        return self.needs_kernel_calibration

    def prepare(self, example_input: torch.Tensor, *, progress: Callable[[str], None] | None = None,
                timer: Callable | None = None, out_dir: Any = None) -> str | None:
        """Kernel calibration (:meth:`calibrate_kernels`) on the first batch, and again on the batch of a step where
        a SWAT-M budget moved a layer's sparsity; the per-layer table goes to ``out_dir/swat_kernels.txt``.
        Under DDP every rank times, then all ranks take rank 0's choice (the kernels fix the summation order)."""
        timings = self.calibrate_kernels(example_input, progress=progress, timer=timer)
        if out_dir is None:
            return self.kernel_summary()
        table = Path(out_dir) / "swat_kernels.txt"
        atomic_write_text(table, sk.format_table(timings) + "\n")
        return f"{self.kernel_summary()} (per layer: {table})"

    def _adopt_rank0_kernels(self) -> None:
        """Under ``torch.distributed`` every rank times its own kernels, and timings differ between ranks: all
        ranks take rank 0's choice (and timings), so they run the same kernels (same summation order)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            return
        mine = {"timings": [t.as_dict() for t in self.kernel_timings or []],
                "sparse_ops": {name: list(layer.sparse_ops) for name, layer in self.layers.items()}}
        box = [mine]
        dist.broadcast_object_list(box, src=0)
        chosen = box[0]
        if set(chosen["sparse_ops"]) != set(self.layers):
            raise RuntimeError("SWAT kernel calibration: rank 0 has other SWAT layers than this rank")
        self.kernel_timings = [sk.KernelTiming(**t) for t in chosen["timings"]]
        for name, layer in self.layers.items():
            layer.sparse_ops = tuple(sk.format_of(f) for f in chosen["sparse_ops"][name])

    def kernel_summary(self) -> str:
        """One line: how many layer-ops run on a sparse kernel (after calibration or with "always"), naming them
        when there are at most four."""
        ops = [bool(op) for layer in self.layers.values() for op in layer.sparse_ops]
        how = {"auto": "measured" if self.kernel_timings is not None else "not calibrated yet",
               "never": "sparse_kernels=never", "always": "sparse_kernels=always"}[self.cfg.sparse_kernels]
        used = [f"{name} {op} {fmt}" for name, layer in self.layers.items()
                for op, fmt in zip(sk.OPS, layer.sparse_ops, strict=True) if fmt]
        named = f": {', '.join(used)}" if 0 < len(used) <= 4 else ""
        cost = f"; timing took {self.kernel_cost_ms / 1e3:.1f} s" if self.kernel_cost_ms else ""  # 0: restored
        return f"SWAT sparse kernels: {sum(ops)} of {len(ops)} layer-ops ({how}){named}; the rest dense{cost}"

    # ---------------------------------------------------------------- execution modes
    def unsupported_reason(self, mode: Any) -> str | None:
        """Why SWAT cannot train in ``mode`` (a :class:`leanprop.modes.ExecutionMode`), or None when it can
        (:func:`leanprop.modes.check_mode` refuses the mode at configuration time). Eager and compiled (SWAT's
        layers run eagerly inside the compiled graph), fp32/bf16/fp16 autocast, channels-last, CPU and CUDA all
        run (tests/test_modes.py, tests/test_swat_compile.py). Refused: ``sparse_kernels="always"`` with bf16
        autocast on CPU, whose forced CSR products PyTorch has no bf16 CPU kernel for ("auto" falls back to the
        dense kernel where a sparse one fails)."""
        if self.cfg.sparse_kernels == "always" and getattr(mode, "device", None) == "cpu" and \
                getattr(mode, "amp", None) == "bf16" and any(any(layer.sparse_ops) for layer in self.layers.values()):
            return ("swat.sparse_kernels=always forces CSR sparse products, which PyTorch lacks for bf16 on CPU; "
                    "set swat.sparse_kernels=auto (times them, keeps dense where sparse fails) or never")
        return None

    # ---------------------------------------------------------------- training hooks
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """SWAT-M reads the optimizer's momentum; other distributions ignore it."""
        if self.momentum is not None:
            from leanprop.swat.momentum import check_optimizer_supports_momentum

            check_optimizer_supports_momentum(optimizer)
        self.optimizer = optimizer

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        self._set_flags()

    def step(self) -> None:
        """After ``optimizer.step()``: update SWAT-M budgets, advance the step, set next step's flags."""
        if self.momentum is not None:
            self._momentum_update()
        self.step_count += 1
        self._set_flags()

    def _recompute_due(self) -> bool:
        return self.epoch < self.cfg.exact_topk_epochs or self.step_count % self.cfg.topk_period == 0

    def _set_flags(self) -> None:
        recompute = self._recompute_due()
        measure = self.step_count % self.measure_every == self.measure_every - 1 or self.step_count == 0
        dense_grad = self.step_count % self.cfg.dense_grad_period == 0
        for layer in self.layers.values():
            layer.recompute = recompute
            layer.measure = measure
            layer.dense_grad = dense_grad

    def _momentum_update(self) -> None:
        if self.optimizer is None:
            raise RuntimeError("SWAT-M needs the optimizer: call controller.attach_optimizer(optimizer) first")
        from leanprop.swat.momentum import mean_abs_momentum_tensor

        means = {name: mean_abs_momentum_tensor(self.optimizer, layer.weight, layer.weight_mask())
                 for name, layer in self.layers.items()}
        known = [name for name, m in means.items() if m is not None]
        dev = means[known[0]].device if known else None
        values = torch.stack([means[n].to(dev) for n in known]).tolist() if known else []  # one host sync
        stats: dict[str, float | None] = dict.fromkeys(means)
        stats.update(zip(known, values, strict=True))
        self.budget = self.momentum.update(stats)
        for name, layer in self.layers.items():
            layer.sparsity = float(self.budget[name])  # applied at the layer's next Top-K recompute

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "epoch": self.epoch,
            "budget": dict(self.budget),
            "layers": {name: {"sparsity": layer.sparsity, "w_threshold": layer.w_threshold.detach().cpu().clone(),
                              "x_threshold": layer.x_threshold.detach().cpu().clone(),
                              "density_stats": layer.density_stats.detach().cpu().clone()}
                       for name, layer in self.layers.items()},
            "momentum": self.momentum.state_dict() if self.momentum is not None else None,
            # the measured kernel choice: a resumed run keeps it (same summation order, bit-identical resume)
            "kernels": None if self.kernel_timings is None else {
                "timings": [t.as_dict() for t in self.kernel_timings], "sparsity": dict(self.kernel_sparsity),
                "sparse_ops": {name: list(layer.sparse_ops) for name, layer in self.layers.items()}},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.layers) ^ set(state["layers"])
        if missing:
            raise ValueError(f"SWAT state does not match the model's SWAT layers (differ: {sorted(missing)[:5]})")
        self.step_count, self.epoch = state["step"], state["epoch"]
        self.budget = dict(state["budget"])
        for name, layer in self.layers.items():
            s = state["layers"][name]
            layer.sparsity = float(s["sparsity"])
            layer.w_threshold.copy_(s["w_threshold"])
            layer.x_threshold.copy_(s["x_threshold"])
            layer.density_stats.copy_(s["density_stats"])
        if self.momentum is not None and state.get("momentum") is not None:
            self.momentum.load_state_dict(state["momentum"])
        kernels = state.get("kernels")  # absent in checkpoints from before the sparse kernels: calibrate again
        if kernels is not None and self.cfg.sparse_kernels == "auto":
            self.kernel_timings = [sk.KernelTiming(**t) for t in kernels["timings"]]
            self.kernel_sparsity = dict(kernels["sparsity"])
            for name, layer in self.layers.items():
                layer.sparse_ops = tuple(sk.format_of(f) for f in kernels["sparse_ops"][name])
        self._set_flags()

    # ---------------------------------------------------------------- reporting
    def layer_stats(self) -> list[dict[str, Any]]:
        """Per layer: target sparsity and the measured weight and activation sparsity."""
        rows = []
        for name, layer in self.layers.items():
            mask = layer.weight_mask()
            w_now = 0.0 if mask is None else 1.0 - float(mask.sum()) / mask.numel()
            measured = layer.swat_measured_density
            rows.append({"name": name, "shape": tuple(layer.weight.shape), "numel": layer.weight.numel(),
                         "target": layer.sparsity, "weight_sparsity": w_now,
                         "act_sparsity": None if measured is None else 1.0 - measured[1]})
        return rows

    def metrics(self) -> dict[str, Any]:
        return self.measured_sparsity()

    def notes(self) -> dict[str, Any]:
        return {"sparse_kernels": self.kernel_summary()}

    def training_flops(self, model: nn.Module, input_shape: tuple[int, ...]) -> tuple[float, str]:
        from leanprop.ops.flops import count_flops

        return 1.0 - count_flops(model, input_shape).training_reduction, self.flops_basis

    def summary_lines(self, model: nn.Module, input_shape: tuple[int, ...], out_dir: Any = None) -> list[str]:
        """Counted training-FLOP reduction and measured sparsities; the per-layer table goes to
        ``out_dir/swat_layers.txt``."""
        from leanprop.ops.flops import count_flops

        report = count_flops(model, input_shape)
        m = self.measured_sparsity()
        where = ""
        if out_dir is not None:
            table = Path(out_dir) / "swat_layers.txt"
            atomic_write_text(table, self.summary() + "\n\n" + report.table() + "\n")
            where = f"  (per layer: {table})"
        act = "-" if m["act_sparsity"] is None else f"{m['act_sparsity']:.1%}"
        first = (f"  training FLOPs -{report.training_reduction:.1%} vs dense (conv/linear, counted from budgets; "
                 f"inference -{report.inference_reduction:.1%}")
        if report.measured_training_reduction is not None:
            first += f"; measured -{report.measured_training_reduction:.1%}"
        return [first + ")", f"  measured sparsity  weights {m['weight_sparsity']:.1%}  activations {act} "
                f"(sparse layers){where}"]

    def measured_sparsity(self) -> dict[str, float | None]:
        """Overall measured weight sparsity (by parameter count, all SWAT layers) and the mean measured
        activation sparsity of the sparsified layers (layers kept dense, e.g. the first, are left out)."""
        rows = self.layer_stats()
        total = sum(r["numel"] for r in rows)
        w = sum(r["weight_sparsity"] * r["numel"] for r in rows) / max(1, total)
        acts = [r["act_sparsity"] for r in rows if r["act_sparsity"] is not None and r["target"] > 0]
        return {"weight_sparsity": w, "act_sparsity": sum(acts) / len(acts) if acts else None}

    def summary(self) -> str:
        rows = self.layer_stats()
        lines = [f"SWAT ({self.cfg.distribution}, target {self.cfg.sparsity:.0%}"
                 + (f", {self.cfg.structure}" if self.cfg.structure else "") + f") after {self.step_count} steps",
                 f"{'layer':<32} {'shape':<20} {'target':>7} {'weights':>8} {'acts':>8}"]
        for r in rows:
            act = "-" if r["act_sparsity"] is None else f"{r['act_sparsity']:.1%}"
            lines.append(f"{r['name'][:32]:<32} {str(r['shape']):<20} {r['target']:>7.1%} "
                         f"{r['weight_sparsity']:>8.1%} {act:>8}")
        m = self.measured_sparsity()
        act = "-" if m["act_sparsity"] is None else f"{m['act_sparsity']:.1%}"
        lines.append(f"{'overall (weights by count; acts: mean of sparse layers)':<53} "
                     f"{m['weight_sparsity']:>16.1%} {act:>8}")
        return "\n".join(lines)
