"""Shared test helpers: fast synthetic trainer settings, and where the real CIFAR-10 data is."""

SYNTH = [
    "data.name=synthetic", "data.synthetic_train=64", "data.synthetic_test=32", "data.batch_size=16",
    "data.eval_batch_size=32", "model.name=resnet20", "train.progress=off", "threads=1",
    "schedule.name=cosine", "optim.lr=0.05",
]


def synth_overrides(out_dir, *extra):
    return [*SYNTH, f"out_dir={out_dir}", "run_name=t", *extra]


def shared_data_root():
    """The CIFAR-10 data folder for data-using tests: $LEANPROP_DATA, else ../shared/data beside the repo."""
    import os
    from pathlib import Path

    from leanprop.data.cifar_jpeg import find_jpeg_files

    env = os.environ.get("LEANPROP_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    has_pickles = (root / "cifar-10-batches-py").is_dir()
    return root if (has_pickles or find_jpeg_files(root)) else None
