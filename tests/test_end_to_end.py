"""The README's main job, checked for accuracy: ResNet-20, one CIFAR-10 epoch, >= 40 % test top-1,
with SWAT-U90 (the quickstart as shipped) and dense.

Slow (about 3 minutes on 2 cores): run with `python -m pytest -m slow`. CI runs the same config through
the README's install command and checks its metrics.csv.
"""

from pathlib import Path

import pytest

from leanprop import config as C
from leanprop.train.trainer import Trainer

from ._helpers import shared_data_root

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("method", [[], ["method.name=dense", "swat=null"]], ids=["swat-u90", "dense"])
def test_quickstart_resnet20_one_epoch_reaches_40_percent(tmp_path, monkeypatch, method):
    root = shared_data_root()
    if root is None:
        pytest.skip("CIFAR-10 data not found: set LEANPROP_DATA to a folder with cifar-10-batches-py/ "
                    "or cifar10/CIFAR-10-images-jpeg.tar.gz")
    monkeypatch.setenv("LEANPROP_CACHE", str(tmp_path / "cache"))
    cfg = C.load(REPO / "configs" / "quickstart.yaml",
                 [f"data.root={root}", f"out_dir={tmp_path}", "train.progress=off", *method])
    res = Trainer(cfg, progress=False).fit()
    assert float(res.final["test_top1"]) >= 40.0, res.final
