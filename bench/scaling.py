"""Data-parallel scaling: ``torchrun -m trainer`` on 2 gloo processes vs ``python -m trainer`` on 1, same work.

Both runs take the same optimizer steps on the same global batch (1 process with batch ``2b``
against 2 processes with batch ``b`` each) over the same tensors in memory
(``data.source=bench.memory:build``); the 1-process run uses as many torch threads as there are
cores, torchrun gives each of the 2 processes ``OMP_NUM_THREADS=1``. Reported: global images/s of
2 processes over 1 (1.0: going data-parallel on the same cores costs nothing).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from bench.common import Row, median, paired_ratios
from bench.versus import Comparison, Workload, compare, rates, run_worker, user_environment


def measure(work: Workload, rounds: int, workdir: Path) -> Comparison:
    """``rounds`` interleaved rounds; ``work.batch`` is the per-process batch of the 2-process run."""
    env = user_environment()
    single = replace(work, batch=2 * work.batch)
    runs = compare({"1 process": lambda: run_worker(single, 1, workdir, "scaling-1", env),
                    "2 processes": lambda: run_worker(work, 2, workdir, "scaling-2", env)}, rounds)
    rate = rates(runs)
    row = Row(f"scaling: {work.label}, 2 processes x batch {work.batch} vs 1 x {single.batch}", "images/s",
              median(rate["2 processes"]), median(rate["1 process"]), "Worker, 1 process", None, True,
              paired_ratios(rate["2 processes"], rate["1 process"]),
              "1 process: torch threads = cores; 2 processes: OMP_NUM_THREADS=1 each (torchrun)")
    return Comparison(row, runs)
