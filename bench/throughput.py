"""Steady-state training throughput on tensors in memory: ``python -m trainer`` vs the hand-written loop.

The Worker reads the tensors through the user data source ``data.source=bench.memory:build``, the
script (``bench/plain_loop.py --memory``) through a DataLoader over the same tensors; both load in
the main process (no loader workers), so what differs is the training loop. On CUDA the Worker's
own MFU (``train/mfu`` in metrics.jsonl) is reported too.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import Row, median, paired_ratios
from bench.versus import Comparison, Workload, compare, rates, run_plain, run_worker, user_environment


def workload(device: str, quick: bool, compiled: bool = False) -> Workload:
    """ResNet-18 64 px fp32 on a CPU; ResNet-50 224 px bf16 channels_last on a GPU (tiny with ``quick``)."""
    if device == "cuda":
        batch, per_class = (64, 13) if quick else (256, 256)
        return Workload("memory 224 px, resnet50", "resnet50", 224, batch, 0, 10, per_class, epochs=2 if quick else 4,
                        device="cuda", bf16=True, channels_last=True, compile=compiled)
    if quick:
        return Workload("memory 16 px, resnet18", "resnet18", 16, 8, 0, 2, 8, epochs=2)
    return Workload("memory 64 px, resnet18", "resnet18", 64, 64, 0, 10, 32)


def measure(work: Workload, rounds: int, workdir: Path, goal: float = 0.97) -> Comparison:
    """``rounds`` interleaved rounds of one Worker job and one script job, one process each."""
    env = user_environment()
    runs = compare({"worker": lambda: run_worker(work, 1, workdir, "throughput", env),
                    "hand-written": lambda: run_plain(work, 1, env)}, rounds)
    rate = rates(runs)
    mfu = [m for run in runs["worker"] for m in run.extra["mfu"][1:] if m is not None]
    note = f"Worker's MFU (metrics.jsonl train/mfu): {median(mfu):.1%}" if mfu else ""
    row = Row(f"throughput: {work.describe()}", "images/s", median(rate["worker"]), median(rate["hand-written"]),
              "hand-written", goal, True, paired_ratios(rate["worker"], rate["hand-written"]), note)
    return Comparison(row, runs)
