"""The horizontal-flip probe of docs/panoptic.md ("Own backbone stages", tried and not kept): the benchmark
with every image of an update step (and of joint retraining) flipped left-right with probability 1/2,
the coins drawn from a generator seeded by the run's seed. Not part of the package.

    FLIP=1 python benchmarks/results/panoptic_query_groups/own_backbone/probes/hflip_probe.py \\
        --scenarios 3-2 --seeds 0 --methods query_groups --out /tmp/flip.json
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[5]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import torch  # noqa: E402

import panoptic_incremental as pi  # noqa: E402
from incremental.plugins import Plugin  # noqa: E402
from incremental.runners.panoptic import PanopticRun  # noqa: E402


class Flip(Plugin):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.g = torch.Generator().manual_seed(seed * 7919 + 17)

    def before_training_iteration(self, strategy, **kw):
        x, ys, t = strategy.mbatch
        coin = torch.rand(len(x), generator=self.g) < 0.5
        if not coin.any():
            return
        x = x.clone()
        x[coin] = x[coin].flip(-1)
        ys = [dict(y, masks=y["masks"].flip(-1)) if c else y for y, c in zip(ys, coin.tolist())]
        strategy.mbatch = [x, ys, t]


original = PanopticRun.train_step


def train_step(self, i):
    if i > 0 and os.environ.get("FLIP") == "1" and not getattr(self, "_flip", None):
        self._flip = Flip(self.cfg.seed)
        self.trainer.add_plugin(self._flip)
    return original(self, i)


PanopticRun.train_step = train_step
sys.exit(pi.main())
