"""Probe: gradient mixing's history_weight lam on a transfer scenario (w_h = lam + max(0,-dot)/|g_h|^2).

    python probe.py SCENARIO LAMS SHOTS SEEDS [MEM]     e.g. probe.py digits_transfer 2,3,4 5,10 0,1,2,3
    CLIP=5 python probe.py ...                          every strategy clipped at 5
Prints general change / transfer accuracy and the paired difference to fine-tuning (mean +- std over seeds).
"""
import sys, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3])); sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import torch
torch.set_num_threads(1)
import gradient_mixing as bench
from incremental.io import write_json  # temp file + rename

LAMS = [float(x) for x in sys.argv[2].split(",")]
shots = [int(x) for x in sys.argv[3].split(",")]
scenario = sys.argv[1]
seeds = [int(x) for x in sys.argv[4].split(",")]
mem = int(sys.argv[5]) if len(sys.argv) > 5 else 200
def plan(scenario, shots):
    p = [("fine-tune (naive)", {"name": "naive"}), ("default", {"name": "gradient_mixing"})]
    p += [(f"lam {lam}", {"name": "gradient_mixing", "history_weight": lam}) for lam in LAMS]
    return p
bench.transfer_plan = plan
import os
if os.environ.get("CLIP"): bench.TRANSFER_GRAD_CLIP = float(os.environ["CLIP"])
res = {}
for sh in shots:
    for seed in seeds:
        out = bench.transfer_seed(scenario, seed, sh, mem, 800)
        for label, r in out.items():
            res.setdefault(sh, {}).setdefault(label, []).append(r)
for sh, rows in res.items():
    ft = rows["fine-tune (naive)"]
    for label, rs in rows.items():
        g = [100*(r["general_after"]-r["general_before"]) for r in rs]
        t = [100*r["transfer_after"] for r in rs]
        d = [100*(r["transfer_after"]-f["transfer_after"]) for r, f in zip(rs, ft)]
        print(f"{scenario} shots {sh} {label:20s} general {statistics.mean(g):+6.2f}  transfer {statistics.mean(t):6.2f}  vs ft {statistics.mean(d):+5.2f} +- {statistics.stdev(d) if len(d)>1 else 0:.2f}", flush=True)
write_json(f"{scenario}_{sys.argv[2]}_{sys.argv[3]}_seeds{sys.argv[4]}.json", {str(k): v for k, v in res.items()})
