"""Data-parallel scaling: training samples per second with 1 and 2 processes (torchrun, gloo on CPU).

Compute-bound configuration: SmallConvNet (2 conv layers, 32 and 64 channels) on 3x32x32 inputs,
global batch 64, one experience of 4,096 seeded random samples with 10 classes, 2 epochs, trained by
this project's Trainer under DDP. Each worker process uses 1 torch thread, so N processes use N
cores; scaling efficiency = (samples/s with N) / (N x samples/s with 1).

    python benchmarks/distributed_scaling.py [--nprocs 1 2] [--out benchmarks/results/distributed_scaling.json]

The parent launches ``torchrun --standalone --nproc_per_node=N`` on this same file with ``--worker``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_SAMPLES, IMAGE, GLOBAL_BATCH, EPOCHS = 4096, 32, 64, 2


def worker(result_path: str) -> None:
    import torch
    from torch import nn

    from incremental import Experience, TensorSamples, Trainer
    from incremental import distributed as dist_utils
    from incremental.models import SmallConvNet

    torch.set_num_threads(1)
    if dist_utils.launched_by_torchrun():
        dist_utils.init_distributed("cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(N_SAMPLES, 3, IMAGE, IMAGE, generator=gen)
    y = torch.randint(0, 10, (N_SAMPLES,), generator=gen)
    torch.manual_seed(0)
    model = SmallConvNet(in_channels=3, image_size=IMAGE, channels=32, n_classes=10)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), nn.CrossEntropyLoss(),
                      train_mb_size=GLOBAL_BATCH, train_epochs=1, seed=0)
    experience = Experience(TensorSamples(x, y), 0, list(range(10)))
    trainer.train_epochs = 1
    trainer.train(experience)  # warm-up epoch (allocator, DDP buckets)
    dist_utils.barrier()
    trainer.train_epochs = EPOCHS
    start = time.perf_counter()
    trainer.train(experience)
    dist_utils.barrier()
    elapsed = time.perf_counter() - start
    if dist_utils.is_main_process():
        Path(result_path).write_text(json.dumps({"world_size": dist_utils.world_size(), "seconds": elapsed,
                                                 "samples_per_s": N_SAMPLES * EPOCHS / elapsed}))
    dist_utils.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed_scaling.json"))
    parser.add_argument("--worker", metavar="RESULT_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    from incremental.io import write_json

    runs: dict[int, list[float]] = {n: [] for n in args.nprocs}
    for _ in range(args.repeats):
        for n in args.nprocs:  # interleaved, so machine noise hits every N alike
            with tempfile.TemporaryDirectory() as tmp:
                result = Path(tmp) / "r.json"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                       __file__, "--worker", str(result)]
                subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                runs[n].append(json.loads(result.read_text())["samples_per_s"])
    best = {n: sorted(v)[len(v) // 2] for n, v in runs.items()}
    base = best[min(best)]
    rows = [{"processes": n, "samples_per_s": best[n], "all_samples_per_s": runs[n],
             "speedup": best[n] / base, "efficiency": best[n] / (n * base)} for n in sorted(best)]
    print(f"{'processes':>9} | {'samples/s':>9} | {'speed-up':>8} | {'efficiency':>10}")
    for r in rows:
        print(f"{r['processes']:>9} | {r['samples_per_s']:9.0f} | {r['speedup']:8.2f} | {100 * r['efficiency']:9.0f}%")
    write_json(args.out, {"config": f"SmallConvNet 3x{IMAGE}x{IMAGE}, global batch {GLOBAL_BATCH}, "
                                    f"{N_SAMPLES} samples x {EPOCHS} epochs, gloo, 1 thread per process",
                          "cpu_count": os.cpu_count(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
