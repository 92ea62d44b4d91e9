"""Run by test_ddp under torchrun: train one epoch on every rank, save this rank's weights."""

import sys
from pathlib import Path

import torch

from leanprop import config as C
from leanprop.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from _helpers import synth_overrides  # noqa: E402

out = Path(sys.argv[1])
cfg = C.load(None, synth_overrides(out, "train.epochs=1", "device=cpu", *sys.argv[2:]))
t = Trainer(cfg, progress=False)
res = t.fit()
rank = torch.distributed.get_rank()
masks = {}
swat = getattr(t.controller, "swat", t.controller)  # SWAT+BLPA: the SWAT part; BLPA alone has no layers
for name, layer in getattr(swat, "layers", {}).items():
    masks[name] = layer.weight_mask()
torch.save({"model": t.model.state_dict(), "final": res.final, "samples": t.data.train.num_samples,
            "masks": masks}, out / f"rank{rank}.pt")
