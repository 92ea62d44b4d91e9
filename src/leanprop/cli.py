"""Command-line interface: ``leanprop train|eval|export|models|plot|flops|bench|report``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leanprop import bench
from leanprop.accounting import flops_cli
from leanprop.bench import report
from leanprop.utils import reexec_under_jemalloc, run_reporting_errors

LONG_RUNNING = {"train", "bench"}
#: ``leanprop bench KIND``: modules with ``add_parser(subparsers)`` that set ``bench_run`` (add new kinds to
#: :data:`leanprop.bench.KINDS`).
BENCH_KINDS = bench.kind_modules()


def _maybe_reexec_with_jemalloc(argv: list[str]) -> None:
    """Restart this process with jemalloc preloaded (glibc malloc re-faults large temporaries every step).

    Only for long-running commands (see :func:`reexec_under_jemalloc` for the other conditions). The allocator
    used is recorded in each run's env.json.
    """
    if argv and argv[0] in LONG_RUNNING:
        reexec_under_jemalloc([sys.executable, "-m", "leanprop", *argv])


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

    e = sub.add_parser("eval", help="evaluate a checkpoint (or a plain state_dict) on the test or val split",
                       description="A checkpoint is evaluated the way its run evaluated it: the run's method is "
                                   "applied (e.g. SWAT's sparse weights), with the run's amp and memory format.")
    e.add_argument("--checkpoint", help="a leanprop checkpoint.pt / best.pt")
    e.add_argument("--weights", help="a plain state_dict file, e.g. from `leanprop export` (needs --model and "
                                     "--dataset)")
    e.add_argument("--model", help="model name for --weights")
    e.add_argument("--dataset", help="dataset name for --weights")
    e.add_argument("--split", choices=["test", "val"], default="test")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.path=x.npz or --set model.kwargs.shortcut=pad")
    e.add_argument("--data-dir")
    e.add_argument("--batch-size", type=int)
    e.add_argument("--threads", type=int, help="torch intra-op threads (default: the run's)")
    e.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the run's, else auto)")

    x = sub.add_parser("export", help="write a checkpoint's evaluation weights as a plain PyTorch state_dict",
                       description="The weights the run's method evaluates with (SWAT: the sparse weights under "
                                   "the run's last threshold / structured mask; others: the weights as they are), "
                                   "as a state_dict for the unconverted model: model.load_state_dict(torch.load(OUT))"
                                   " evaluates like `leanprop eval --checkpoint`.")
    x.add_argument("--checkpoint", required=True, help="a leanprop checkpoint.pt / best.pt")
    x.add_argument("--out", required=True, help="the .pt file to write (written atomically)")

    m = sub.add_parser("models", help="list the model registry")
    m.add_argument("--family", choices=["cifar", "imagenet"])
    m.add_argument("--params", action="store_true", help="also build each model and count parameters")

    pl = sub.add_parser("plot", help="draw loss/accuracy curves of a run to PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="output PNG (default: RUN_DIR/curves.png)")
    flops_cli.add_parser(sub)
    report.add_parser(sub)

    b = sub.add_parser("bench", help="benchmarks: " + ", ".join(bench.KINDS),
                       description="Measurements that compare training methods on the same model; each kind appends "
                                   "JSONL records under benchmarks/results/ (run from the repository root) and "
                                   "`leanprop report` turns them into docs/benchmarks.md.")
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


def _load_plain_state(path: str) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path} is not a readable state_dict ({e})") from e
    if isinstance(state, dict) and state.get("format") == "leanprop-checkpoint":
        raise ValueError(f"{path} is a leanprop checkpoint: evaluate it with --checkpoint {path}")
    return state


def _restore_run_model(model, cfg, ck: dict):
    """Apply the run's method to the plain ``model`` and load the checkpoint's weights and method state (the
    thresholds SWAT evaluates with, ...); returns the controller (None: dense)."""
    from leanprop.train.trainer import build_method

    controller = build_method(model, cfg)
    model.load_state_dict(ck["model"])
    if controller is not None and ck.get("method") is not None:
        controller.load_state_dict(ck["method"])
    return controller


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from leanprop import config as C
    from leanprop.data import build_data
    from leanprop.train.checkpoint import load_checkpoint
    from leanprop.train.trainer import build_model, evaluate, resolve_device

    ck = None
    if args.checkpoint:
        ck = load_checkpoint(args.checkpoint)
        cfg = C.from_dict(C.apply_overrides(ck["config"], args.overrides))
    elif args.weights:
        if not (args.model and args.dataset):
            raise C.ConfigError("--weights needs --model NAME and --dataset NAME")
        cfg = C.load(None, [f"model.name={args.model}", f"data.name={args.dataset}", *args.overrides])
        state = _load_plain_state(args.weights)
    else:
        raise C.ConfigError("leanprop eval needs --checkpoint FILE or --weights FILE --model NAME --dataset NAME")
    if args.data_dir:
        cfg.data.root = args.data_dir
    if args.batch_size:
        cfg.data.eval_batch_size = args.batch_size
    if args.split == "val" and cfg.data.val_split <= 0:
        raise C.ConfigError("--split val: this run has no validation split (data.val_split=0)")
    threads = args.threads or cfg.threads
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(args.device or (cfg.device if ck is not None else "auto"))
    data = build_data(cfg.data, seed=cfg.seed, progress=sys.stderr.isatty())
    model = build_model(cfg, data).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ck is not None:  # evaluated as the run evaluated it (trainer's end of epoch): the method's own eval rule
        _restore_run_model(model, cfg, ck)
    else:
        model.load_state_dict(state)
    loader = data.test if args.split == "test" else data.val
    r = evaluate(model, loader, device, amp=cfg.train.amp, channels_last=cfg.train.channels_last)
    method = f" ({cfg.method.name})" if ck is not None and cfg.method.name != "dense" else ""
    print(f"{cfg.model.name}{method} on {cfg.data.name} {args.split}: top-1 {r['top1']:.2f}%  "
          f"top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}  ({r['n']} images)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from leanprop import config as C
    from leanprop import models
    from leanprop.data import build_data
    from leanprop.export import inference_state_dict
    from leanprop.train.checkpoint import load_checkpoint
    from leanprop.train.trainer import model_args
    from leanprop.utils import atomic_torch_save

    ck = load_checkpoint(args.checkpoint)
    cfg = C.from_dict(ck["config"])
    margs = ck.get("model_args")
    if margs is None:  # a checkpoint from before model_args: the data tell the classes and channels
        margs = model_args(cfg, build_data(cfg.data, seed=cfg.seed, progress=sys.stderr.isatty()))
    model = models.create(cfg.model.name, **margs)
    _restore_run_model(model, cfg, ck)
    state = inference_state_dict(model)
    atomic_torch_save(state, args.out)
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() > 1]
    zeros = sum(int((w == 0).sum()) for w in weights) / max(1, sum(w.numel() for w in weights))
    extra = "".join(f" --set model.kwargs.{k}={v}" for k, v in margs.items() if k not in ("num_classes",
                                                                                         "in_channels"))
    print(f"wrote {args.out}: plain state_dict of {cfg.model.name} with the weights method {cfg.method.name} "
          f"evaluates with ({zeros:.1%} of conv/linear weights zero); evaluate it with `leanprop eval --weights "
          f"{args.out} --model {cfg.model.name} --dataset {cfg.data.name}{extra}`")
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


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "models": cmd_models, "plot": cmd_plot,
            "flops": flops_cli.run, "bench": cmd_bench, "report": report.main}


def main(argv: list[str] | None = None) -> int:
    """Entry point. Called with ``argv=None`` (the console script) it may re-exec under jemalloc."""
    if argv is None:
        argv = sys.argv[1:]
        _maybe_reexec_with_jemalloc(argv)
    args = _parser().parse_args(argv)
    what = " ".join(filter(None, (args.command, getattr(args, "bench", None))))
    try:
        return run_reporting_errors(f"leanprop {what}", COMMANDS[args.command], args)
    except KeyboardInterrupt:
        print("interrupted; the last complete epoch's checkpoint is kept (resume with --resume auto)",
              file=sys.stderr)
        return 130
