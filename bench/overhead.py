"""Framework overhead on tiny steps: ``python -m trainer`` vs the hand-written loop when the model costs ~nothing.

One Linear layer on 16 px tensors in memory, batch 16, 2,000 steps per epoch, 1 torch thread on both
sides (``OMP_NUM_THREADS=1``: waking a second thread for every tiny op costs more than the op), with
the Worker's logging on (TensorBoard and metrics.jsonl, running loss every ``log.every_steps``) and
its progress bar on (stderr goes to a pipe). Both sides load in the main process, so the Worker's
per-sample work (its sampler, the per-sample seeding of the augmentation) counts against it.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import Row, median, paired_ratios
from bench.versus import Comparison, Workload, compare, rates, run_plain, run_worker, user_environment


def workload(quick: bool) -> Workload:
    steps = 100 if quick else 2000
    return Workload("tiny steps: memory 16 px, linear", "linear", 16, 16, 0, 10, steps * 16 // 10, epochs=3,
                    extra=("log.progress_bar=on", "log.trackers=[tensorboard,jsonl]", "log.every_steps=50"))


def measure(work: Workload, rounds: int, workdir: Path, goal: float = 1.2) -> Comparison:
    """``rounds`` interleaved rounds; the row is in microseconds per step (lower is better)."""
    env = user_environment(OMP_NUM_THREADS="1")
    runs = compare({"worker": lambda: run_worker(work, 1, workdir, "overhead", env),
                    "hand-written": lambda: run_plain(work, 1, env)}, rounds)
    us = {side: [work.batch / rate * 1e6 for rate in values] for side, values in rates(runs).items()}
    row = Row(f"{work.describe()}, 1 thread, logging + bar on", "us/step", median(us["worker"]),
              median(us["hand-written"]), "hand-written", goal, False, paired_ratios(us["worker"], us["hand-written"]),
              "TensorBoard + metrics.jsonl, running loss every 50 steps; progress bar to a pipe")
    return Comparison(row, runs)
