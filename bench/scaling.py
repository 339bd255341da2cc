"""Data-parallel scaling: the Worker in 2 processes (torchrun, gloo on CPU) vs 1 process, same total work.

Both runs take the same optimizer steps on the same global batch: 1 process with batch ``2b``
against 2 processes with batch ``b`` each. Each run is a fresh child (``python -m bench.scaling``,
under ``torchrun --standalone --nproc_per_node=2`` for 2 processes) that times several epochs of
in-memory batches after a warm-up and prints one ``BENCH_RESULT {json}`` line from rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import Row, Spec, build_worker, interleave, make_batches, median, paired_ratios, time_worker_epoch
from trainer import distributed

REPO = Path(__file__).resolve().parents[1]
MARKER = "BENCH_RESULT "


def measure(spec: Spec, workdir: Path, steps: int, warmup: int, epochs: int, repeats: int) -> Row:
    """Interleave 1-process and 2-process runs; ``spec.batch`` is the per-process batch of the 2-process run."""
    single = replace(spec, batch=2 * spec.batch)
    runs = {"1 process": lambda: _launch(single, 1, workdir, steps, warmup, epochs),
            "2 processes": lambda: _launch(spec, 2, workdir, steps, warmup, epochs)}
    rates = interleave(runs, repeats)
    return Row(f"scaling 2 proc x batch {spec.batch} vs 1 x {single.batch} ({spec.model} {spec.image_size}px)",
               "images/s", median(rates["2 processes"]), median(rates["1 process"]), "Worker, 1 process",
               None, True, paired_ratios(rates["2 processes"], rates["1 process"]),
               note="1 process: torch threads = cores; 2 processes: OMP_NUM_THREADS=1 each")


def _launch(spec: Spec, nproc: int, workdir: Path, steps: int, warmup: int, epochs: int) -> float:
    """Run one child job; return the median of its epochs' global images/s."""
    args = ["--model", spec.model, "--image-size", str(spec.image_size), "--batch", str(spec.batch),
            "--classes", str(spec.classes), "--precision", spec.precision, "--device", spec.device,
            "--channels-last", str(int(spec.channels_last)), "--steps", str(steps),
            "--warmup", str(warmup), "--epochs", str(epochs), "--workdir", str(workdir)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "bench.scaling", *args]
    else:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "bench.scaling", *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return median(json.loads(lines[-1][len(MARKER):])["images_per_s"])


# ----------------------------------------------------------------------------- the child process
def child(argv: list[str] | None = None) -> None:
    """One rank: build the Worker (joining the process group under torchrun), time epochs, report."""
    parser = argparse.ArgumentParser(prog="python -m bench.scaling")
    for name, kind in [("model", str), ("image-size", int), ("batch", int), ("classes", int), ("precision", str),
                       ("device", str), ("channels-last", int), ("steps", int), ("warmup", int), ("epochs", int),
                       ("workdir", Path)]:
        parser.add_argument(f"--{name}", type=kind, required=True)
    args = parser.parse_args(argv)
    spec = Spec(args.model, args.image_size, args.batch, args.classes, args.precision, bool(args.channels_last),
                args.device)
    world = distributed.discover().world_size
    worker = build_worker(spec, args.workdir, f"scaling-{world}")
    batches = make_batches(spec, args.steps, seed=worker.env.rank)
    time_worker_epoch(worker, batches[:args.warmup])
    rates = []
    for _ in range(args.epochs):
        distributed.barrier(worker.env)  # start together; the last rank to finish sets the pace
        start = time.perf_counter()
        time_worker_epoch(worker, batches)
        distributed.barrier(worker.env)
        rates.append(world * spec.batch * args.steps / (time.perf_counter() - start))
    if worker.env.is_main:
        print(MARKER + json.dumps({"world": world, "threads": torch.get_num_threads(), "images_per_s": rates}),
              flush=True)
    env = worker.env
    worker.sinks.close()
    del worker
    distributed.teardown(env)
    sys.stdout.flush()
    os._exit(0)  # as trainer.__main__.main: no gloo thread may abort interpreter teardown


if __name__ == "__main__":
    child()
