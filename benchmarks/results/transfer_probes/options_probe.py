"""Probe: gradient-mixing plugin options on a transfer scenario, paired with fine-tuning seed by seed.

    python options_probe.py SCENARIO SHOTS SEEDS MEM 'LABEL=JSON' ...
    e.g. options_probe.py fashion_transfer 10,50 0,1 200 'shift 1={"history_shift": 1}'
    python options_probe.py combine FILE.json ...      one table over the seeds of several runs
Every option set is added to the old flat form {name: gradient_mixing} (plugin options, or
storage_policy for the library); fine-tuning and the plugin's defaults always run. CLIP=5 clips every
strategy at 5. Prints general change / transfer accuracy / transfer minus fine-tuning (mean +- std over
seeds) and writes the per-seed results as JSON in the working directory, named by scenario, memory,
shots, seeds and option labels (temp file + rename).
"""
import json, os, statistics, sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def table(title: str, res: dict[str, dict[str, list]]) -> None:
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
    for sh, rows in res.items():
        ft = rows["fine-tune (naive)"]
        for label, rs in rows.items():
            g = [100 * (r["general_after"] - r["general_before"]) for r in rs]
            t = [100 * r["transfer_after"] for r in rs]
            d = [100 * (r["transfer_after"] - f["transfer_after"]) for r, f in zip(rs, ft)]
            print(f"{title} shots {sh} {label:24s} general {statistics.mean(g):+6.2f} +- {sd(g):4.2f}  "
                  f"transfer {statistics.mean(t):6.2f}  vs ft {statistics.mean(d):+5.2f} +- {sd(d):.2f}  (n={len(rs)})",
                  flush=True)


if sys.argv[1] == "combine":
    merged: dict[str, dict[str, list]] = {}
    for name in sys.argv[2:]:
        try:
            results = json.loads(Path(name).read_text())["results"]
        except (OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"{name}: not a result of this probe ({exc})") from None
        for sh, rows in results.items():
            for label, rs in rows.items():
                merged.setdefault(sh, {}).setdefault(label, []).extend(rs)
    table("combined", merged)
    sys.exit(0)

import torch
torch.set_num_threads(1)
import gradient_mixing as bench
from incremental.io import write_json  # temp file + rename

scenario, shots = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
seeds, mem = [int(s) for s in sys.argv[3].split(",")], int(sys.argv[4])
def option_set(arg: str) -> tuple[str, dict]:
    """'LABEL=JSON' -> (label, options); a malformed argument stops with one line naming it."""
    label, sep, text = arg.partition("=")
    try:
        options = json.loads(text) if sep else None
    except ValueError as exc:
        raise SystemExit(f"option set {arg!r}: not LABEL=JSON ({exc})") from None
    if not isinstance(options, dict):
        raise SystemExit(f"option set {arg!r}: not LABEL=JSON with a JSON object")
    return label, options


options = [option_set(arg) for arg in sys.argv[5:]]
bench.transfer_plan = lambda scenario, shots: ([("fine-tune (naive)", {"name": "naive"}),
                                                ("default", {"name": "gradient_mixing"})]
                                               + [(label, {"name": "gradient_mixing", **o}) for label, o in options])
if os.environ.get("CLIP"):
    bench.TRANSFER_GRAD_CLIP = float(os.environ["CLIP"])
res: dict[str, dict[str, list]] = {}
for sh in shots:
    for seed in seeds:
        for label, r in bench.transfer_seed(scenario, seed, sh, mem, 800).items():
            res.setdefault(str(sh), {}).setdefault(label, []).append(r)
table(f"{scenario} mem {mem}", res)
tag = "_".join("".join(c if c.isalnum() else "-" for c in label) for label, _ in options) or "defaults"
write_json(f"{scenario}_mem{mem}_shots{sys.argv[2]}_seeds{sys.argv[3]}_{tag}.json",
           {"options": dict(options), "results": res})
