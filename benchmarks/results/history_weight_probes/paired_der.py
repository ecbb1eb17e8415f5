"""A grid's low-forgetting runs against Avalanche DER on the same seeds, paired seed by seed: mean ± std
of (ours - DER) average accuracy in points, its 95% t interval and on how many seeds ours is ahead, per
epochs and memory size. Reads the grid's ``plugins=gradient_mix~*`` runs (the setting with options; the
plain ``plugins=gradient_mixing`` runs are left out) and the DER lines of the benchmark's ``--log``.

    python paired_der.py runs/fm_hws_32 benchmarks/results/split_fashion_mnist_seeds32-39_clip_runs.jsonl
"""
import json, glob, re, statistics as st, sys
from scipy import stats
runs_dir, jsonl = sys.argv[1], sys.argv[2]
av = {}
for line in open(jsonl):
    r = json.loads(line)
    if r["label"].startswith("avalanche DER"):
        av[(r["seed"], r["epochs"], r["mem"])] = r["average_accuracy"]
ours = {}
for p in glob.glob(runs_dir + "/plugins=gradient_mix~*/results.json"):
    name = p.split("/")[-2]
    e, m, s = (int(re.search(k + r"=(\d+)", name).group(1)) for k in ("epochs", "mem_size", "seed"))
    ours[(s, e, m)] = json.load(open(p))["average_accuracy"]
for e in (1, 3):
    for m in (200, 500):
        keys = sorted(k for k in ours if k[1:] == (e, m) and k in av)
        d = [100 * (ours[k] - av[k]) for k in keys]
        mean, sd = st.mean(d), st.stdev(d)
        half = stats.t.ppf(0.975, len(d) - 1) * sd / len(d) ** 0.5
        print(f"epochs {e} mem {m}: ours - DER {mean:+.2f} ± {sd:.2f} [{mean-half:+.2f}, {mean+half:+.2f}], ahead on {sum(x>0 for x in d)} of {len(d)}")
