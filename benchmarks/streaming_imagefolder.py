"""Streaming proof: train on an ImageFolder larger than the process's memory footprint, with random
augmentation, through ``incremental run``, and measure samples per second and peak resident memory.

Generates (once, deterministic from ``--seed``) ``--images`` PNGs of ``--size`` x ``--size`` RGB in 10
class folders (coloured shapes on textured backgrounds), then runs a 5-experience class-incremental
scenario over them with random crops and flips (drawn per sample and per epoch, also for replayed
samples) with ``train.num_workers`` 0 and 2, each in its own process. Peak memory is sampled from
/proc for the whole process tree (the run and its DataLoader workers) every 50 ms and compared with
the decoded size of the data set (uint8 and float32). Memory is PSS summed over the tree (shared
pages of forked workers counted once); importing torch and torchvision alone takes about 0.85 GiB. The model is deliberately small (an MLP on
images resized to 64x64) so the data path, not the model, sets the pace.

    python benchmarks/streaming_imagefolder.py [--images 20000] [--size 192] [--data DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from incremental.io import write_json  # noqa: E402

N_CLASSES = 10


def generate(root: Path, n_images: int, size: int, seed: int) -> None:
    """``root/class_k/NNNNNN.png``: a filled shape of class k's kind and colour on a noisy background."""
    from PIL import Image, ImageDraw
    from tqdm import tqdm

    marker = root / ".complete"
    if marker.exists() and json.loads(marker.read_text()) == {"images": n_images, "size": size, "seed": seed}:
        return
    rng = np.random.RandomState(seed)
    for i in tqdm(range(n_images), desc="generating PNGs", unit="img"):
        label = i % N_CLASSES
        background = rng.randint(0, 90, size=(size // 8, size // 8, 3)).astype(np.uint8)
        image = Image.fromarray(background).resize((size, size), Image.NEAREST)
        draw = ImageDraw.Draw(image)
        colour = tuple(int(c) for c in (np.array([37, 91, 173]) * (label + 1)) % 200 + 55)
        r = rng.randint(size // 6, size // 3)
        cx, cy = rng.randint(r, size - r, size=2)
        box = [cx - r, cy - r, cx + r, cy + r]
        kind = label % 5
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        elif kind == 2:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        elif kind == 3:
            draw.line([(cx - r, cy - r), (cx + r, cy + r)], fill=colour, width=max(2, r // 3))
            draw.line([(cx - r, cy + r), (cx + r, cy - r)], fill=colour, width=max(2, r // 3))
        else:
            draw.ellipse(box, outline=colour, width=max(2, r // 3))
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:06d}.png", optimize=False)
    marker.write_text(json.dumps({"images": n_images, "size": size, "seed": seed}))


def tree_pss_bytes(pid: int) -> int:
    """Proportional resident memory (PSS) of ``pid`` and every descendant, from /proc: pages shared
    by forked DataLoader workers (torch's libraries, about 0.85 GiB of a CUDA build) count once."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
        stack += children.get(current, [])
    return total


def run_once(data: Path, out: Path, workers: int, seed: int) -> dict:
    config = {
        "seed": seed,
        "scenario": {"name": "class_incremental", "source": "imagefolder", "root": str(data), "test_fraction": 0.1,
                     "n_experiences": 5, "transforms": {"resize": [64, 64], "random_crop": {"padding": 4},
                                                        "horizontal_flip": 0.5}},
        "strategy": {"plugins": [{"name": "replay"}], "history": {"mem_size": 500}},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "num_workers": workers, "eval_batch_size": 256},
        "model": {"name": "mlp", "hidden_size": 64},
    }
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    run_dir = out / "run"
    cmd = [sys.executable, "-m", "incremental", "run", str(config_path), "--out", str(run_dir), "--quiet", "--force"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_pss_bytes(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"run with num_workers={workers} failed (exit {code})")
    results = json.loads((run_dir / "results.json").read_text())
    return {"num_workers": workers, "wall_s": wall, "train_eval_s": results["train_eval_time_s"],
            "peak_pss_bytes": peak, "average_accuracy": results["average_accuracy"],
            "history_bytes": results["history_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "streaming_imagefolder")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "streaming_imagefolder.json")
    args = parser.parse_args()
    data = args.data / "images"
    generate(data, args.images, args.size, args.seed)
    decoded_uint8 = args.images * args.size * args.size * 3
    n_train = args.images - args.images // 10  # scenario.test_fraction 0.1 (stratified)
    rows = []
    for workers in (0, 2):
        row = run_once(data, args.data / f"workers_{workers}", workers, args.seed)
        row["train_samples_per_s"] = n_train / row["train_eval_s"]
        rows.append(row)
    print(f"ImageFolder of {args.images} PNGs, {args.size}x{args.size} RGB: decoded {decoded_uint8 / 2**20:.0f} MiB as "
          f"uint8, {4 * decoded_uint8 / 2**20:.0f} MiB as float32; 1 epoch, random crop + flip, replay 500")
    print(f"{'num_workers':>11} | {'train+eval s':>12} | {'samples/s':>9} | {'peak PSS MiB':>12} | {'PSS / uint8 size':>16} | {'accuracy':>8}")
    for row in rows:
        print(f"{row['num_workers']:>11} | {row['train_eval_s']:>12.1f} | {row['train_samples_per_s']:>9.0f} | "
              f"{row['peak_pss_bytes'] / 2**20:>12.0f} | {row['peak_pss_bytes'] / decoded_uint8:>16.2f} | "
              f"{row['average_accuracy']:>8.3f}")
    write_json(args.out, {"command": " ".join(["python", "benchmarks/streaming_imagefolder.py", *sys.argv[1:]]),
                          "images": args.images, "size": args.size, "decoded_uint8_bytes": decoded_uint8,
                          "decoded_float32_bytes": 4 * decoded_uint8, "cpu_count": os.cpu_count(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
