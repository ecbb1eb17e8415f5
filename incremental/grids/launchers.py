"""Where the cells of a grid run: processes on this machine, or a Slurm job array through submitit.

Either way a cell is the same command, ``incremental run CELL/config.yaml --out CELL --resume --quiet``
(under ``torchrun`` when the grid asks for data parallelism), with its output in ``CELL/run.log``: a
cell is exactly an ordinary run, and re-running it continues from its last checkpoint.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence


@dataclass
class CellJob:
    """What a launcher needs to run one cell (plain data: submitit pickles it)."""

    name: str
    dir: str
    command: list[str]
    env: dict[str, str]


def cell_command(cell_dir: Path, torchrun: dict[str, Any] | None = None) -> list[str]:
    """The ``incremental run`` command of a cell, under ``torchrun`` when ``torchrun`` asks for it."""
    run = ["-m", "incremental", "run", str(cell_dir / "config.yaml"), "--out", str(cell_dir), "--resume", "--quiet"]
    if torchrun:
        nproc = int(torchrun.get("nproc_per_node", 1))
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *run]
    return [sys.executable, *run]


def start_cell(job: CellJob) -> subprocess.Popen:
    """Start the cell's run, appending its output to ``CELL/run.log``."""
    log_path = Path(job.dir) / "run.log"
    log = open(log_path, "ab")
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(job.command)}\n".encode())
    log.flush()
    try:
        return subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **job.env})
    finally:
        log.close()  # the child holds its own descriptor


def run_cell(job: CellJob) -> int:
    """Run one cell to its end and return the exit code (the function a submitit job calls)."""
    return start_cell(job).wait()


def last_line(path: Path) -> str:
    """The last non-empty line of a log (the one-line error of a failed run, usually)."""
    try:
        lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


OnDone = Callable[[CellJob, "int | None", str], None]


def run_local(jobs: Sequence[CellJob], parallel: int, on_done: OnDone) -> None:
    """Run cells as child processes, ``parallel`` at a time; ``on_done(job, exit code, message)`` after each.

    Ctrl-C (or any exception here) terminates the running cells; their checkpoints let the next
    ``incremental grid`` resume them.
    """
    running: dict[int, subprocess.Popen] = {}
    lock = threading.Lock()

    def work(job: CellJob) -> int:
        proc = start_cell(job)
        with lock:
            running[id(job)] = proc
        try:
            return proc.wait()
        finally:
            with lock:
                running.pop(id(job), None)

    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    futures: dict[Future, CellJob] = {pool.submit(work, job): job for job in jobs}
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = futures[future]
                code = future.result()
                on_done(job, code, "" if code == 0 else last_line(Path(job.dir) / "run.log"))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        with lock:
            procs = list(running.values())
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        raise
    pool.shutdown()


def run_submitit(jobs: Sequence[CellJob], parallel: int, on_done: OnDone, folder: Path,
                 params: dict[str, Any], poll_s: float = 1.0) -> None:
    """Submit the cells as one job array through submitit and wait for them.

    ``params``: the grid file's ``submitit:`` section: ``cluster`` (``slurm``, or ``local`` to run the
    same code path on this machine; default: detected) and any ``AutoExecutor.update_parameters``
    option (``timeout_min``, ``slurm_partition``, ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``, ...).
    ``parallel`` (``--jobs``) becomes ``slurm_array_parallelism``.
    """
    import submitit

    options = dict(params)
    cluster = options.pop("cluster", None)
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    defaults: dict[str, Any] = {"name": "incremental-grid", "timeout_min": 60, "slurm_array_parallelism": parallel}
    executor.update_parameters(**{**defaults, **options})
    submitted = executor.map_array(run_cell, list(jobs))
    pending = dict(zip(submitted, jobs))
    try:
        while pending:
            for handle in [h for h in pending if h.done()]:
                job = pending.pop(handle)
                try:
                    code, message = handle.result(), ""
                except Exception as exc:  # noqa: BLE001 - the job itself failed (timeout, node failure, ...)
                    code, message = None, (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                if code not in (0, None) and not message:
                    message = last_line(Path(job.dir) / "run.log")
                on_done(job, code, message)
            if pending:
                time.sleep(poll_s)
    except BaseException:
        for handle in pending:
            handle.cancel(check=False)
        raise
