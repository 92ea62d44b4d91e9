"""Command-line interface: ``leanprop train|eval|models|plot|flops|bench|report``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from leanprop.accounting import flops_cli, matrix, memory_cli, report

JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
LONG_RUNNING = {"train", "bench"}
#: ``leanprop bench KIND``: modules with ``add_parser(subparsers)`` that set ``bench_run`` (add new kinds here).
BENCH_KINDS = (memory_cli, matrix)


def _jemalloc_path() -> str | None:
    return next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)


def _maybe_reexec_with_jemalloc(argv: list[str]) -> None:
    """Restart this process with jemalloc preloaded (glibc malloc re-faults large temporaries every step).

    Only for long-running commands (see :func:`reexec_under_jemalloc` for the other conditions). The allocator
    used is recorded in each run's env.json.
    """
    if argv and argv[0] in LONG_RUNNING:
        reexec_under_jemalloc([sys.executable, "-m", "leanprop", *argv])


def reexec_under_jemalloc(cmd: list[str]) -> None:
    """Replace this process by ``cmd`` with jemalloc preloaded -- only on Linux, when libjemalloc.so.2 is
    installed, ``LEANPROP_ALLOCATOR`` is unset or ``auto`` (``system`` turns it off) and jemalloc is not
    preloaded already; otherwise return and let the caller go on. Benchmark scripts call it first so that
    their timings use the allocator ``leanprop bench`` uses."""
    if not sys.platform.startswith("linux"):
        return
    if os.environ.get("LEANPROP_ALLOCATOR", "auto") != "auto" or "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = _jemalloc_path()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = (lib + " " + env.get("LD_PRELOAD", "")).strip()
    env.setdefault("MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1")
    env["LEANPROP_ALLOCATOR"] = "jemalloc"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leanprop", description="Memory- and compute-efficient back-propagation.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("--config", help="YAML config (see configs/); optional when resuming a run dir")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    t.add_argument("--data-dir", help="data root (default: $LEANPROP_DATA, then ~/.cache/leanprop/data)")
    t.add_argument("--threads", type=int, help="torch intra-op threads")
    t.add_argument("--resume", help="'auto' (latest checkpoint of this run name), a run dir, or a checkpoint file")
    t.add_argument("--out-dir", help="parent folder of run directories (default: runs)")
    t.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--progress", choices=["auto", "on", "off"], help="progress bars (default: only on a TTY)")

    e = sub.add_parser("eval", help="evaluate a checkpoint (or a plain state_dict) on the test or val split")
    e.add_argument("--checkpoint", help="a leanprop checkpoint.pt / best.pt")
    e.add_argument("--weights", help="a plain state_dict file (needs --model and --dataset)")
    e.add_argument("--model", help="model name for --weights")
    e.add_argument("--dataset", help="dataset name for --weights")
    e.add_argument("--split", choices=["test", "val"], default="test")
    e.add_argument("--data-dir")
    e.add_argument("--batch-size", type=int)
    e.add_argument("--threads", type=int)
    e.add_argument("--device", default="auto")

    m = sub.add_parser("models", help="list the model registry")
    m.add_argument("--family", choices=["cifar", "imagenet"])
    m.add_argument("--params", action="store_true", help="also build each model and count parameters")

    pl = sub.add_parser("plot", help="draw loss/accuracy curves of a run to PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="output PNG (default: RUN_DIR/curves.png)")
    flops_cli.add_parser(sub)
    report.add_parser(sub)

    b = sub.add_parser("bench", help="measure methods: memory, matrix (every method x model)",
                       description="Measurements that compare training methods on the same model.")
    kinds = b.add_subparsers(dest="bench", required=True, metavar="KIND")
    for module in BENCH_KINDS:
        module.add_parser(kinds)
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from leanprop import config as C
    from leanprop.train.checkpoint import load_checkpoint
    from leanprop.train.trainer import CHECKPOINT_NAME, Trainer

    overrides = list(args.overrides)
    for flag, key in (("data_dir", "data.root"), ("threads", "threads"), ("out_dir", "out_dir"),
                      ("device", "device"), ("progress", "train.progress")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.config is None and args.resume not in (None, "auto"):
        p = Path(args.resume)
        saved = load_checkpoint(p / CHECKPOINT_NAME if p.is_dir() else p)["config"]
        cfg = C.from_dict(C.apply_overrides(saved, overrides))
    elif args.config is None:
        if not args.overrides:
            raise C.ConfigError("leanprop train needs --config FILE (e.g. configs/quickstart.yaml), "
                                "or --resume RUN_DIR to continue a run with its saved config, "
                                "or --set KEY=VALUE overrides of the defaults")
        cfg = C.load(None, overrides)
    else:
        cfg = C.load(args.config, overrides)
    progress = {"on": True, "off": False, True: True, False: False}.get(cfg.train.progress)
    result = Trainer(cfg, resume=args.resume, progress=progress).fit()
    return 0 if result.final else 1


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from leanprop import config as C
    from leanprop import models
    from leanprop.data import build_data
    from leanprop.train.checkpoint import load_checkpoint
    from leanprop.train.trainer import evaluate, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        ck = load_checkpoint(args.checkpoint)
        cfg = C.from_dict(ck["config"])
        state = ck["model"]
    elif args.weights:
        if not (args.model and args.dataset):
            raise C.ConfigError("--weights needs --model NAME and --dataset NAME")
        cfg = C.from_dict({"model": {"name": args.model}, "data": {"name": args.dataset}})
        try:
            state = torch.load(args.weights, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{args.weights} is not a readable state_dict ({e})") from e
    else:
        raise C.ConfigError("leanprop eval needs --checkpoint FILE or --weights FILE --model NAME --dataset NAME")
    if args.data_dir:
        cfg.data.root = args.data_dir
    if args.batch_size:
        cfg.data.eval_batch_size = args.batch_size
    if args.split == "val" and cfg.data.val_split <= 0:
        raise C.ConfigError("--split val: this run has no validation split (data.val_split=0)")
    device = resolve_device(args.device)
    data = build_data(cfg.data, seed=cfg.seed, progress=sys.stderr.isatty())
    model = models.create(cfg.model.name, num_classes=cfg.model.num_classes or data.num_classes,
                          **cfg.model.kwargs).to(device)
    model.load_state_dict(state)
    loader = data.test if args.split == "test" else data.val
    r = evaluate(model, loader, device, amp=cfg.train.amp)
    print(f"{cfg.model.name} on {cfg.data.name} {args.split}: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  "
          f"loss {r['loss']:.4f}  ({r['n']} images)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from leanprop import models

    names = models.list_models(args.family)
    print(f"{'name':<20} {'family':<9} {'input':>5}" + ("  params" if args.params else "") + "  description")
    for n in names:
        info = models.model_info(n)
        extra = ""
        if args.params:
            m = models.create(n)
            extra = f"  {sum(p.numel() for p in m.parameters()) / 1e6:6.2f}M"
        print(f"{n:<20} {info.family:<9} {info.input_size:>5}{extra}  {info.description}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from leanprop.train.plot import plot_run

    out = plot_run(args.run_dir, args.out)
    print(f"wrote {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    return args.bench_run(args)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "models": cmd_models, "plot": cmd_plot, "flops": flops_cli.run,
            "bench": cmd_bench, "report": report.main}


def main(argv: list[str] | None = None) -> int:
    """Entry point. Called with ``argv=None`` (the console script) it may re-exec under jemalloc."""
    if argv is None:
        argv = sys.argv[1:]
        _maybe_reexec_with_jemalloc(argv)
    args = _parser().parse_args(argv)
    from leanprop.config import ConfigError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError, FloatingPointError, ImportError) as e:
        if os.environ.get("LEANPROP_DEBUG"):
            raise
        what = " ".join(filter(None, (args.command, getattr(args, "bench", None))))
        print(f"leanprop {what}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last complete epoch's checkpoint is kept (resume with --resume auto)",
              file=sys.stderr)
        return 130
