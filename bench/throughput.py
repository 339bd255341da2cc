"""Steady-state training throughput: the Worker vs the hand-written loop, interleaved in one process.

On CUDA also the model FLOPs utilisation (MFU) and how many synchronizing CUDA calls each side
makes per epoch (``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import (PlainLoop, Row, Spec, build_worker, interleave, make_batches, max_param_diff, median,
                          paired_ratios, recorded, snapshot, time_worker_epoch)

PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0,
}
"""Dense bf16 tensor-core peaks (NVIDIA datasheets, no sparsity), matched against the device name."""


@dataclass
class Throughput:
    """The result of :func:`measure`: the table row plus the details printed under the table."""

    row: Row
    images_per_s: dict[str, list[float]]
    step_us: dict[str, list[float]]  # every timed step's wall time, all rounds pooled
    param_max_abs_diff: float
    param_max_abs_moved: float
    gflop_per_image: float
    peak_tflops: float | None
    syncs_per_epoch: dict[str, int] | None
    steps: int

    def mfu(self, side: str) -> float | None:
        """Achieved training FLOP/s over the peak (forward + backward FLOPs, optimizer not counted)."""
        if not self.peak_tflops:
            return None
        return median(self.images_per_s[side]) * self.gflop_per_image * 1e9 / (self.peak_tflops * 1e12)


def measure(spec: Spec, workdir: Path, steps: int, warmup: int, repeats: int,
            peak_tflops: float | None = None, goal: float = 0.97) -> Throughput:
    """Interleave ``repeats`` timed epochs of ``steps`` batches on each side, after ``warmup`` untimed ones."""
    worker = build_worker(spec, workdir, f"throughput-{spec.model}")
    plain = PlainLoop(spec, worker.net)
    start = snapshot(plain.model)
    batches = make_batches(spec, steps)
    time_worker_epoch(worker, batches[:warmup])
    plain.run(batches[:warmup])
    step_us: dict[str, list[float]] = {"worker": [], "plain": []}
    timings = interleave({"worker": recorded(lambda b: time_worker_epoch(worker, b), batches, step_us["worker"]),
                          "plain": recorded(plain.run, batches, step_us["plain"])}, repeats)
    rates = {side: [spec.batch * steps / t.wall for t in values] for side, values in timings.items()}
    cpu = {side: median([t.cpu for t in values]) for side, values in timings.items()}
    final = snapshot(plain.model)  # both sides saw the same batches from the same weights:
    diff, moved = max_param_diff(worker.net.state_dict(), final), max_param_diff(start, final)
    device = torch.device(spec.device)
    syncs = None
    if device.type == "cuda":
        syncs = {"worker": count_syncs(lambda: time_worker_epoch(worker, batches)),
                 "plain": count_syncs(lambda: plain.run(batches))}
    row = Row(f"throughput {spec.describe()}", "images/s", median(rates["worker"]), median(rates["plain"]),
              "hand-written", goal, True, paired_ratios(rates["worker"], rates["plain"]),
              cpu["plain"] / cpu["worker"] if device.type == "cpu" else None)
    return Throughput(row, rates, step_us, diff, moved, training_flops(plain, spec) / spec.batch / 1e9,
                      peak_tflops or peak_for(device), syncs, steps)


def training_flops(plain: PlainLoop, spec: Spec) -> float:
    """FLOPs of one forward + backward pass on one batch, counted on a copy of the model."""
    model = copy.deepcopy(plain.model)
    images, targets, _ = make_batches(spec, 1, seed=1)[0]
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(images.device.type, dtype=spec.autocast_dtype, enabled=spec.autocast_dtype is not None):
            loss = plain.criterion(model(images), targets)
        loss.backward()
    return float(counter.get_total_flops())


def peak_for(device: torch.device) -> float | None:
    """The bf16 dense peak of this GPU in TFLOP/s, if it is in :data:`PEAK_BF16_TFLOPS`."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def count_syncs(run: Callable[[], object]) -> int:
    """How many synchronizing CUDA calls ``run`` makes (its own final synchronize included)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
