"""Accuracy / forgetting of a grid's runs per set of 8 seeds (0-7, 8-15, ...), per epochs and memory size:
the seed sets docs/gradient_mixing.md compares with Avalanche's runs of the same seeds.

    python benchmarks/results/history_weight_probes/seed_sets.py runs/fm_hw_shift
"""
import glob
import json
import re
import statistics as st
import sys

rows: dict[tuple[int, int, int], list[tuple[float, float]]] = {}
for path in glob.glob(sys.argv[1] + "/*/results.json"):
    name = path.split("/")[-2]
    result = json.load(open(path))
    epochs, mem, seed = (int(re.search(key + r"=(\d+)", name).group(1)) for key in ("epochs", "mem_size", "seed"))
    rows.setdefault((seed // 8, epochs, mem), []).append((result["average_accuracy"], result["forgetting"]))
for key in sorted(rows):
    acc = [100 * a for a, _ in rows[key]]
    fgt = [100 * f for _, f in rows[key]]
    print(f"seeds {8 * key[0]}-{8 * key[0] + 7} ep {key[1]} mem {key[2]} n={len(acc)}: "
          f"{st.mean(acc):.1f} ± {st.stdev(acc):.1f} / {st.mean(fgt):.1f} ± {st.stdev(fgt):.1f}")
