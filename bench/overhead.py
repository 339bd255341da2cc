"""Framework overhead on tiny steps: the Worker vs the hand-written loop when the model costs ~nothing.

One Linear layer, a tiny batch, thousands of steps, with the Worker's metric logging (TensorBoard
every ``log.every_steps``) and its progress bar on (tqdm writes to /dev/null here).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from bench.common import (Batch, PlainLoop, Row, Spec, Timing, build_worker, interleave, make_batches,
                          max_param_diff, median, paired_ratios, recorded, snapshot, time_worker_epoch)
from trainer.worker import Worker


@dataclass
class Overhead:
    """The result of :func:`measure`: the table row plus both sides' per-step times."""

    row: Row
    us_per_step: dict[str, list[float]]
    cpu_us_per_step: dict[str, list[float]]
    step_us: dict[str, list[float]]  # every single step's wall time, all rounds pooled
    param_max_abs_diff: float
    param_max_abs_moved: float
    steps: int


def measure(spec: Spec, workdir: Path, steps: int, warmup: int, repeats: int, threads: int = 1,
            goal: float = 1.2) -> Overhead:
    """Interleave timed epochs of ``steps`` tiny steps on each side, after a short untimed one."""
    worker = build_worker(spec, workdir, "overhead", extra=["log.progress_bar=on"])
    plain = PlainLoop(spec, worker.net)
    start = snapshot(plain.model)
    batches = make_batches(spec, steps)
    with torch_threads(threads):
        quiet_epoch(worker, batches[:warmup])
        plain.run(batches[:warmup])
        step_us: dict[str, list[float]] = {"worker": [], "hand-written": []}
        timings = interleave({"worker": recorded(lambda b: quiet_epoch(worker, b), batches, step_us["worker"]),
                              "hand-written": recorded(plain.run, batches, step_us["hand-written"])}, repeats)
    us = {side: [t.wall / steps * 1e6 for t in values] for side, values in timings.items()}
    cpu_us = {side: [t.cpu / steps * 1e6 for t in values] for side, values in timings.items()}
    final = snapshot(plain.model)
    row = Row(f"tiny steps: {spec.describe()}, {steps} steps, {threads} thread, logging + bar on", "us/step",
              median(us["worker"]), median(us["hand-written"]), "hand-written", goal, False,
              paired_ratios(us["worker"], us["hand-written"]),
              median(cpu_us["worker"]) / median(cpu_us["hand-written"]),
              note=f"TensorBoard scalars every {worker.cfg.log.every_steps} steps; tqdm to /dev/null")
    return Overhead(row, us, cpu_us, step_us, max_param_diff(worker.net.state_dict(), final), max_param_diff(start, final),
                    steps)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` torch threads, for both sides alike.

    One thread by default: waking a second OpenMP thread for every tiny op costs more than the op
    and varies wildly on a shared machine, which would hide the overhead being measured. Set after
    ``build_worker``, since ``distributed.setup`` sets the thread count too.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quiet_epoch(worker: Worker, batches: Sequence[Batch]) -> Timing:
    """:func:`time_worker_epoch` with stderr (the tqdm bar) sent to /dev/null."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        return time_worker_epoch(worker, batches)
