"""Shared settings for fast trainer tests on the synthetic dataset."""

SYNTH = [
    "data.name=synthetic", "data.synthetic_train=64", "data.synthetic_test=32", "data.batch_size=16",
    "data.eval_batch_size=32", "model.name=resnet20", "train.progress=off", "threads=1",
    "schedule.name=cosine", "optim.lr=0.05",
]


def synth_overrides(out_dir, *extra):
    return [*SYNTH, f"out_dir={out_dir}", "run_name=t", *extra]
