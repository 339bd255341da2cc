"""Framework overhead on tiny steps: the Worker vs the hand-written loop when the model costs ~nothing.

One Linear layer, a tiny batch, thousands of steps, with the Worker's metric logging (TensorBoard
every ``log.every_steps``) and its progress bar on (tqdm writes to /dev/null here). Optionally:

* an ablation: the same timing with one Worker feature removed at a time (patched in this process
  only, trainer/ is untouched), which attributes the overhead to features;
* an op census: which ATen ops the Worker runs per step beyond the hand-written loop's.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

import trainer.worker
from bench.common import (Batch, PlainLoop, Row, Spec, build_worker, interleave, make_batches, max_param_diff,
                          median, paired_ratios, snapshot, time_worker_epoch)
from trainer.worker import Worker


@dataclass
class Overhead:
    """The result of :func:`measure`: the table row plus per-variant times and the op census."""

    row: Row
    us_per_step: dict[str, list[float]]
    param_max_abs_diff: float
    param_max_abs_moved: float
    extra_ops_per_step: dict[str, float]
    steps: int


def measure(spec: Spec, workdir: Path, steps: int, warmup: int, repeats: int, ablation: bool = False,
            goal: float = 1.2) -> Overhead:
    """Interleave timed epochs of ``steps`` tiny steps: Worker, hand-written, and (``ablation``) variants."""
    worker = build_worker(spec, workdir, "overhead", extra=["log.progress_bar=on"])
    plain = PlainLoop(spec, worker.net)
    start = snapshot(plain.model)
    batches = make_batches(spec, steps)
    runs: dict[str, Callable[[list[Batch]], float]] = {"worker": lambda b: quiet_epoch(worker, b),
                                                       "hand-written": plain.run}
    if ablation:  # a second Worker, so that the first one and the plain loop stay in lockstep
        probe = build_worker(spec, workdir, "overhead-ablation", extra=["log.progress_bar=on"])
        runs.update({f"worker {name}": _variant(probe, patch) for name, patch in ABLATIONS.items()})
    for run in runs.values():  # warm-up: one short untimed epoch each
        run(batches[:warmup])
    seconds = interleave({name: (lambda run=run: run(batches)) for name, run in runs.items()}, repeats)
    us = {name: [s / steps * 1e6 for s in values] for name, values in seconds.items()}
    final = snapshot(plain.model)
    diff, moved = max_param_diff(worker.net.state_dict(), final), max_param_diff(start, final)
    census = op_census(worker, plain, batches[:200]) if ablation else {}
    row = Row(f"tiny steps: {spec.describe()}, {steps} steps, logging + progress bar on", "us/step",
              median(us["worker"]), median(us["hand-written"]), "hand-written", goal, False,
              paired_ratios(us["worker"], us["hand-written"]),
              f"TensorBoard scalars every {worker.cfg.log.every_steps} steps; tqdm to /dev/null")
    return Overhead(row, us, diff, moved, census, steps)


def quiet_epoch(worker: Worker, batches: list[Batch]) -> float:
    """:func:`time_worker_epoch` with stderr (the tqdm bar) sent to /dev/null."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        return time_worker_epoch(worker, batches)


# ----------------------------------------------------------------------------- ablation
Patch = Callable[[Worker], contextlib.AbstractContextManager]


@contextlib.contextmanager
def _setting(worker: Worker, key: str, value: Any) -> Iterator[None]:
    section, name = key.split(".")
    node = getattr(worker.cfg, section)
    old = getattr(node, name)
    setattr(node, name, value)
    try:
        yield
    finally:
        setattr(node, name, old)


class _NoOpMeter(trainer.worker.TrainMeter):  # type: ignore[misc, valid-type]
    """A TrainMeter whose per-step update does nothing (so its per-step cost is removed)."""

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None


def _no_meter(worker: Worker) -> contextlib.AbstractContextManager:
    return mock.patch.object(trainer.worker, "TrainMeter", _NoOpMeter)


def _no_scheduler(worker: Worker) -> contextlib.AbstractContextManager:
    return mock.patch.object(worker.scheduler, "step", lambda *args, **kwargs: None)


def _everything(worker: Worker) -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    for patch in (_no_bar, _no_logging, _no_meter, _no_scheduler):
        stack.enter_context(patch(worker))
    return stack


def _no_bar(worker: Worker) -> contextlib.AbstractContextManager:
    return _setting(worker, "log.progress_bar", "off")


def _no_logging(worker: Worker) -> contextlib.AbstractContextManager:
    # Longer than an epoch, so nothing is logged; not huge: TrainMeter allocates a window this long.
    return _setting(worker, "log.every_steps", 100_000)


ABLATIONS: dict[str, Patch] = {
    "(2nd copy, as configured)": lambda worker: contextlib.nullcontext(),
    "without progress bar": _no_bar,
    "without metric logging": _no_logging,
    "without TrainMeter.update": _no_meter,
    "without scheduler.step": _no_scheduler,
    "without all four": _everything,
}
"""Worker features removed one at a time (in this process only), to attribute the overhead."""


def _variant(worker: Worker, patch: Patch) -> Callable[[list[Batch]], float]:
    def run(batches: list[Batch]) -> float:
        with patch(worker):
            return quiet_epoch(worker, batches)
    return run


# ----------------------------------------------------------------------------- op census
def op_census(worker: Worker, plain: PlainLoop, batches: list[Batch]) -> dict[str, float]:
    """ATen ops per step that the Worker's epoch runs beyond the hand-written loop's (profiler counts)."""
    def counts(run: Callable[[], float]) -> Counter:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        return Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})

    extra = counts(lambda: quiet_epoch(worker, batches)) - counts(lambda: plain.run(batches))
    return {name: n / len(batches) for name, n in extra.most_common() if n >= len(batches) / 10}
