import sys, math, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3])); sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import torch; torch.set_num_threads(1)
import gradient_mixing as bench
from strategies.gradient_mixing import GradientMixingPlugin
import incremental.runners.transfer as tr
orig = tr.TransferRun.step
found = {}
def step(self, i):
    r = orig(self, i)
    for p in self.trainer.plugins:
        if isinstance(p, GradientMixingPlugin):
            found[p.history_weight] = p
    return r
tr.TransferRun.step = step
def plan(scenario, shots):
    return [("ft", {"name": "naive"}), ("l1", {"name": "gradient_mixing"}), ("l3", {"name": "gradient_mixing", "history_weight": 3.0})]
bench.transfer_plan = plan
for seed in [0, 1]:
    out = bench.transfer_seed("digits_transfer", seed, 5, 200, 800)
    print(seed, {k: (round(v["general_after"]*100,1), round(v["transfer_after"]*100,1)) for k, v in out.items()})
    for lam, p in sorted(found.items()):
        rows = [r for exp in p.stats.values() for r in exp]
        for part, rr in (("first 100", rows[:100]), ("last 200", rows[-200:])):
            f = lambda k: statistics.mean(r[k] for r in rr)
            print(f"  lam {lam} {part}: conflict {f('conflict'):.2f} sim {f('similarity'):+.3f} w_h {f('w_h'):.2f} |g_h| {f('norm_h'):.3f} |g_t| {f('norm_t'):.3f} loss_h {f('loss_h'):.3f} loss_t {f('loss_t'):.3f}")
