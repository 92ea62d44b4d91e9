"""The training loop: epochs of SGD with per-iteration LR, eval every epoch, atomic checkpoints, resume.

Bit-identical resume: the data order and augmentation of epoch ``e`` depend only on (seed, epoch, rank);
the checkpoint written at the end of each epoch holds model, optimizer, grad scaler, RNG states,
epoch/step and the method controller's state, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from leanprop import allocator, models
from leanprop.config import ConfigError, RunConfig, malloc_mmap_threshold_bytes, method_configs, to_dict
from leanprop.data import DataBundle, build_data
from leanprop.methods import Controller
from leanprop.modes import ExecutionMode, check_mode
from leanprop.nn.convert import convert_
from leanprop.ops.autocast import autocast_context
from leanprop.train import checkpoint as ckpt_io
from leanprop.train import distributed as dist_util
from leanprop.train.optim import build_optimizer
from leanprop.train.run_log import MetricsCSV, TensorBoard, write_config, write_env
from leanprop.train.schedules import LRSchedule
from leanprop.utils import atomic_torch_save, environment

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
#: Steps between the finiteness checks of the training loss (each one waits for the device) and between progress-bar
#: updates (only when the bar is shown); both also happen at the end of every epoch.
FINITE_CHECK_EVERY = 50
PROGRESS_EVERY = 10


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA GPU is available: use device=cpu (or auto)")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_run_name(cfg: RunConfig) -> str:
    return cfg.run_name or f"{cfg.model.name}-{cfg.data.name}-{cfg.method.name}"


def resolve_run_dir(cfg: RunConfig, resume: str | None) -> tuple[Path, Path | None]:
    """Pick the run directory and the checkpoint to resume from (if any).

    ``resume=None``: a new directory ``out_dir/name`` (``name-2``, ``name-3``… if taken; never overwritten).
    ``resume="auto"``: the most recently checkpointed of ``name``, ``name-N``; a fresh run if none has one.
    ``resume=PATH``: that checkpoint file, or the ``checkpoint.pt`` inside that run directory.
    """
    base = Path(cfg.out_dir) / default_run_name(cfg)
    if resume not in (None, "auto"):
        p = Path(resume)
        ck = p / CHECKPOINT_NAME if p.is_dir() else p
        if not ck.is_file():
            raise FileNotFoundError(f"--resume {resume}: no checkpoint at {ck}")
        return ck.parent, ck
    if resume == "auto":
        cands = [d for d in [base, *base.parent.glob(base.name + "-*")] if (d / CHECKPOINT_NAME).is_file()]
        if cands:
            d = max(cands, key=lambda d: (d / CHECKPOINT_NAME).stat().st_mtime)
            return d, d / CHECKPOINT_NAME
        if base.is_dir():  # started before but died before its first checkpoint: start it again in place
            return base, None
    run_dir, n = base, 1
    while run_dir.exists() and any(run_dir.iterdir()):
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir, None


def build_method(model: nn.Module, cfg: RunConfig) -> Controller:
    """Convert ``model`` in place for ``cfg.method`` (a method spec) and return its controller
    (:class:`leanprop.methods.Controller`; dense: the base controller, which does nothing)."""
    return convert_(model, method_configs(cfg))


def model_args(cfg: RunConfig, data: DataBundle) -> dict:
    """``models.create`` arguments of the run: its classes (``model.num_classes``, else the data's) and the data's
    image channels (``in_channels``, e.g. 1 for a grayscale npz) plus ``model.kwargs``."""
    kwargs = dict(cfg.model.kwargs)
    channels = kwargs.pop("in_channels", data.in_channels)
    if channels != data.in_channels:
        raise ConfigError(f"model.kwargs.in_channels={channels!r} but the data have {data.in_channels} channel(s); "
                          "drop model.kwargs.in_channels (it is taken from the data)")
    return {"num_classes": cfg.model.num_classes or data.num_classes, "in_channels": data.in_channels, **kwargs}


def build_model(cfg: RunConfig, data: DataBundle) -> nn.Module:
    """The plain (unconverted) model of ``cfg`` for ``data`` (see :func:`model_args`)."""
    return models.create(cfg.model.name, **model_args(cfg, data))


def _hit_counts(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Top-k hit counts as a float64 tensor on the logits' device (no host sync)."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hit = top.eq(target[:, None])
    return torch.stack([hit[:, : min(k, k_max)].any(dim=1).sum() for k in ks]).double()


def accuracy_counts(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    return _hit_counts(logits, target, ks).tolist()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, amp: str | None = None,
             channels_last: bool = False, dist_info: dist_util.DistInfo | None = None) -> dict:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the loader, summed exactly over ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1, top-5: read once at the end
    n = 0
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with autocast_context(device, amp):
            out = model(x)
        out = out.float()
        sums[0] += F.cross_entropy(out, y, reduction="sum").double()
        sums[1:] += _hit_counts(out, y)
        n += y.numel()
    loss_sum, top1, top5 = sums.tolist()
    loss_sum, top1, top5, n = dist_util.all_reduce_sum([loss_sum, top1, top5, float(n)], device,
                                                        dist_info or dist_util.DistInfo())
    model.train(was_training)
    if n == 0:
        return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "n": 0}
    return {"loss": loss_sum / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "n": int(n)}


@dataclass
class FitResult:
    run_dir: Path
    final: dict = field(default_factory=dict)  # last metrics row
    train_images_per_s: float = 0.0  # whole training steps (data + forward + backward + update)
    data_images_per_s: float = 0.0  # the data pipeline alone (time spent waiting for batches)
    best: dict | None = None
    epochs_run: int = 0


class Trainer:
    """Builds data, model, optimizer and schedule from a :class:`RunConfig` and trains it."""

    def __init__(self, cfg: RunConfig, *, resume: str | None = None, progress: bool | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dist = dist_util.init_from_env(self.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if cfg.train.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs a CUDA GPU; on CPU use train.amp=bf16")
        threads = cfg.threads
        if threads is None and self.dist.enabled and self.device.type == "cpu":
            threads = max(1, (torch.get_num_threads() or 1) // int(_env_int("LOCAL_WORLD_SIZE", self.dist.world_size)))
        if threads:
            torch.set_num_threads(threads)
        mmap_threshold = malloc_mmap_threshold_bytes(cfg)
        if mmap_threshold is not None:
            try:
                allocator.set_mmap_threshold(mmap_threshold)
            except ValueError as e:
                raise ConfigError(f"malloc_mmap_threshold: {e}") from None
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.show_progress = self._progress_enabled(progress)

        run_dir, resume_ckpt = resolve_run_dir(cfg, resume)
        if self.dist.enabled:  # every rank uses rank 0's choice
            obj = [(str(run_dir), str(resume_ckpt) if resume_ckpt else None)]
            torch.distributed.broadcast_object_list(obj, src=0)
            run_dir, resume_ckpt = Path(obj[0][0]), (Path(obj[0][1]) if obj[0][1] else None)
        self.run_dir = run_dir
        self.resume_ckpt = resume_ckpt

        seed_everything(cfg.seed)
        self.data: DataBundle = build_data(cfg.data, seed=cfg.seed, rank=self.dist.rank,
                                           world_size=self.dist.world_size,
                                           progress=self.show_progress and self.dist.is_main)
        self.model = build_model(cfg, self.data).to(self.device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.controller = build_method(self.model, cfg)
        # a mode the method cannot honour is refused here, never run silently wrong
        check_mode(self.controller, ExecutionMode.of_run(cfg, self.device), method=cfg.method.name)
        torch.manual_seed(cfg.seed + self.dist.rank)  # per-rank dropout; parameters come from rank 0 via DDP
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.controller.attach_optimizer(self.optimizer)
        self.schedule = LRSchedule(cfg.schedule, cfg.optim.lr, len(self.data.train), cfg.train.epochs)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" else None
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.train.compile:
            self.train_model = torch.compile(self.train_model)
        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimizer steps
        self.best: dict | None = None

    @staticmethod
    def _progress_enabled(progress: bool | None) -> bool:
        return progress if progress is not None else sys.stderr.isatty()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "format": ckpt_io.FORMAT,
            "version": ckpt_io.VERSION,
            "config": to_dict(self.cfg),
            "model": self.model.state_dict(),
            "model_args": model_args(self.cfg, self.data),  # what models.create needs (export without the data)
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": ckpt_io.rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "method": self.controller.state_dict() or None,  # None: the method keeps no state (dense)
            "best": self.best,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config"]["model"]["name"] != self.cfg.model.name:
            raise ValueError(f"checkpoint is for model {state['config']['model']['name']!r}, "
                             f"the config asks for {self.cfg.model.name!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("method") is not None:
            self.controller.load_state_dict(state["method"])
        ckpt_io.set_rng_state(state["rng"])
        self.epoch, self.step, self.best = state["epoch"], state["step"], state.get("best")

    # ---------------------------------------------------------------- training
    def fit(self) -> FitResult:
        cfg, main = self.cfg, self.dist.is_main
        metrics = MetricsCSV(self.run_dir / "metrics.csv")
        if self.resume_ckpt is not None:
            # loaded on the CPU: the RNG states must stay CPU ByteTensors; the rest is copied to the device
            self.load_state_dict(ckpt_io.load_checkpoint(self.resume_ckpt, map_location="cpu"))
            if main:
                self._say(f"Resumed {self.resume_ckpt} at epoch {self.epoch}, step {self.step}")
        if main and metrics.path.exists():
            metrics.truncate_after(self.epoch)  # rows of epochs whose checkpoint was never written
        if self.resume_ckpt is not None and (self.epoch >= cfg.train.epochs or self._budget_done()):
            rows = metrics.read() if metrics.path.exists() else []
            if main:
                self._say(self._complete_message())
            dist_util.barrier(self.dist)
            return FitResult(self.run_dir, final=rows[-1] if rows else {"epoch": self.epoch}, best=self.best)
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_config(self.run_dir, to_dict(cfg))
            write_env(self.run_dir, environment(self.device, self.dist.world_size))
            self._say(f"{self.data.description}; model {cfg.model.name}; run dir {self.run_dir}")
        result = FitResult(self.run_dir, best=self.best)
        tb = TensorBoard(self.run_dir) if (cfg.train.tensorboard and main) else None
        images = 0
        train_time = data_time = 0.0
        row: dict = {}
        try:
            while self.epoch < cfg.train.epochs and not self._budget_done():
                stats = self._train_epoch()
                images += stats["images"]
                train_time += stats["seconds"]
                data_time += stats["data_seconds"]
                row = self._end_epoch(stats, metrics, tb)
                result.epochs_run += 1
        finally:
            if tb:
                tb.close()
        result.final = row or (metrics.read()[-1] if metrics.read() else {})
        result.best = self.best
        world = self.dist.world_size
        result.train_images_per_s = world * images / train_time if train_time else 0.0
        result.data_images_per_s = world * images / data_time if data_time else float("inf")
        if main:
            self._summary(result)
        dist_util.barrier(self.dist)
        return result

    def _budget_done(self) -> bool:
        return self.cfg.train.max_steps is not None and self.step >= self.cfg.train.max_steps

    def _complete_message(self) -> str:
        """The one line a resumed run that has nothing left to train prints (no speeds: nothing was timed)."""
        budget = (f"train.max_steps={self.cfg.train.max_steps} reached" if self._budget_done()
                  and self.epoch < self.cfg.train.epochs else f"{self.epoch} of {self.cfg.train.epochs} epochs done")
        return (f"run already complete: {budget}, {self.step} steps, in {self.run_dir}; nothing to train "
                "(raise train.epochs or train.max_steps to continue)")

    def _check_finite(self, loss_sum: torch.Tensor, loss: torch.Tensor) -> None:
        """Raise the clear error when the running loss stopped being finite (one host sync)."""
        if not math.isfinite(float(loss_sum)):
            raise FloatingPointError(
                f"Training loss became {float(loss.detach())} at epoch {self.epoch + 1}, step {self.step}. "
                f"Nothing was written for this epoch; the last good checkpoint (if any) is in {self.run_dir}. "
                "Lower optim.lr, set train.grad_clip (e.g. 5.0), or use train.amp=bf16 instead of fp16."
            )

    def _train_epoch(self) -> dict:
        cfg, dev = self.cfg, self.device
        loader = self.data.train
        loader.set_epoch(self.epoch)
        self.controller.on_epoch_start(self.epoch)
        self.train_model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.float64, device=dev)
        seen = steps = 0  # this epoch's images and steps (host counters: reading them never syncs)
        show = self.show_progress and self.dist.is_main
        bar = tqdm(total=len(loader), desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}", unit="batch",
                   disable=not show, leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        data_seconds = 0.0
        it = iter(loader)
        while True:
            td = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            data_seconds += time.perf_counter() - td
            lr = self.schedule.lr_at(self.step)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            x = x.to(dev, non_blocking=True)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(dev, non_blocking=True)
            if self.controller.needs_prepare:
                self._prepare_method(x)
            with autocast_context(dev, cfg.train.amp):
                out = self.train_model(x)
                loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.optim.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if cfg.train.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.controller.step()
            self.step += 1
            steps += 1
            n = y.numel()
            seen += n
            loss_sum += loss.detach().double() * n  # accumulated on the device: no host sync per step
            correct += out.detach().argmax(1).eq(y).sum()
            if steps % FINITE_CHECK_EVERY == 0:
                self._check_finite(loss_sum, loss)
            if show:  # the progress bar's numbers are the only per-step reads of device values
                bar.update(1)
                if steps % PROGRESS_EVERY == 0 or steps == len(loader):
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{100 * float(correct) / seen:.1f}",
                                    lr=f"{lr:.3g}", ips=f"{self.dist.world_size * seen / elapsed:.0f}")
            if self._budget_done():
                break
        bar.close()
        seconds = time.perf_counter() - t0
        if steps:
            self._check_finite(loss_sum, loss)
        tot_loss, tot_correct, tot_seen = dist_util.all_reduce_sum(
            [float(loss_sum), float(correct), float(seen)], dev, self.dist)
        if not math.isfinite(tot_loss):  # another rank's loss (this rank's was checked above)
            raise FloatingPointError(f"Training loss is not finite at the end of epoch {self.epoch + 1} on another "
                                     "rank; lower optim.lr or set train.grad_clip.")
        return {"loss": tot_loss / max(1, tot_seen), "top1": 100 * tot_correct / max(1, tot_seen),
                "images": seen, "seconds": seconds, "data_seconds": data_seconds, "lr": lr if seen else None}

    def _end_epoch(self, stats: dict, metrics: MetricsCSV, tb: TensorBoard | None) -> dict:
        cfg = self.cfg
        self.epoch += 1
        last = self.epoch >= cfg.train.epochs or self._budget_done()
        row: dict[str, Any] = {
            "epoch": self.epoch, "step": self.step, "lr": stats["lr"], "train_loss": stats["loss"],
            "train_top1": stats["top1"], "epoch_seconds": stats["seconds"],
            "train_images_per_s": self.dist.world_size * stats["images"] / max(stats["seconds"], 1e-9),
            "data_images_per_s": (self.dist.world_size * stats["images"] / stats["data_seconds"]
                                  if stats["data_seconds"] > 0 else None),
        }
        row.update(self.controller.metrics())
        dist_util.broadcast_buffers(self.model, self.dist)
        if self.epoch % cfg.train.eval_every == 0 or last:
            kw = dict(amp=cfg.train.amp, channels_last=cfg.train.channels_last, dist_info=self.dist)
            test = evaluate(self.model, self.data.test, self.device, **kw)
            row.update(test_loss=test["loss"], test_top1=test["top1"], test_top5=test["top5"])
            if self.data.val is not None:
                val = evaluate(self.model, self.data.val, self.device, **kw)
                row.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
        is_best = (cfg.train.save_best == "val" and row.get("val_top1") is not None
                   and (self.best is None or row["val_top1"] > self.best["val_top1"]))
        if is_best:
            self.best = {k: row[k] for k in ("epoch", "val_top1", "test_top1") if k in row}
        if self.dist.is_main:
            metrics.append(row)
            if tb:
                tb.log(row, self.step)
            state = self.state_dict()
            atomic_torch_save(state, self.run_dir / CHECKPOINT_NAME)
            if is_best:
                atomic_torch_save(state, self.run_dir / BEST_NAME)
            msg = (f"epoch {self.epoch}/{cfg.train.epochs}: train loss {stats['loss']:.3f} "
                   f"acc {stats['top1']:.1f}% | {row['train_images_per_s']:.0f} img/s")
            if "test_top1" in row:
                msg += f" | test top-1 {row['test_top1']:.2f}%"
            if "val_top1" in row:
                msg += f" | val top-1 {row['val_top1']:.2f}%"
            if row.get("weight_sparsity") is not None:
                act = row.get("act_sparsity")
                msg += f" | sparsity W {row['weight_sparsity']:.1%}" + (f" X {act:.1%}" if act is not None else "")
            self._say(msg)
        dist_util.barrier(self.dist)
        return row

    def _prepare_method(self, x: torch.Tensor) -> None:
        """The method's calibration on this batch (``Controller.prepare``, e.g. timing its kernels), in the
        run's autocast; its table goes to the run dir (main rank) and its one line to the log."""
        bar = tqdm(desc=f"preparing {self.cfg.method.name}", unit="step", leave=False, dynamic_ncols=True,
                   disable=not (self.show_progress and self.dist.is_main))
        with autocast_context(self.device, self.cfg.train.amp):
            line = self.controller.prepare(x, progress=lambda _name: bar.update(),
                                           out_dir=self.run_dir if self.dist.is_main else None)
        bar.close()
        if line and self.dist.is_main:
            self._say(line)

    def _say(self, msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    def _summary(self, r: FitResult) -> None:
        f = r.final
        lines = ["", "=" * 64, f"leanprop run finished: {self.cfg.model.name} on {self.cfg.data.name}, "
                 f"method {self.cfg.method.name}, {self.epoch} epoch(s), {self.step} steps"]
        if f.get("test_top1") not in (None, ""):
            lines.append(f"  test accuracy  top-1 {float(f['test_top1']):.2f}%   top-5 {float(f['test_top5']):.2f}%"
                         f"   (final-epoch model)")
        if r.best:
            lines.append(f"  best on validation: epoch {r.best['epoch']}, val top-1 {r.best['val_top1']:.2f}% "
                         f"-> {BEST_NAME}")
        shape = (1, self.data.in_channels, self.data.image_size, self.data.image_size)
        lines += self.controller.summary_lines(self.model, shape, self.run_dir)
        lines.append(f"  training speed {r.train_images_per_s:.0f} images/s "
                     f"(data pipeline alone {r.data_images_per_s:.0f} images/s), "
                     f"{torch.get_num_threads()} thread(s), {self.device}")
        lines.append(f"  run dir        {self.run_dir}  (metrics.csv, checkpoint.pt; `leanprop plot {self.run_dir}`)")
        lines.append("=" * 64)
        print("\n".join(lines), flush=True)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default
