"""Where does the Worker lose time on tiny steps? Remove one feature at a time and time it again.

Variants of the tiny-step case (one Linear layer), all interleaved, many rounds, reported as
per-step wall-time percentiles (most steps are never preempted) and the minimum whole-epoch CPU
time per step (noise on a shared machine only ever adds):

* Worker variants with one feature patched out, in this process only (trainer/ is untouched);
* hand-written variants with one Worker habit added (foreach SGD, ``loss / grad_accum_steps``).

Plus an op census: ATen ops per step on each side, the Worker's charged to the trainer/ source
line that issued them (the backward pass counts on the ``backward()`` line).
"""

from __future__ import annotations

import contextlib
import linecache
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from unittest import mock

import trainer.worker
import torch
from bench.common import (MOMENTUM, WEIGHT_DECAY, Batch, PlainLoop, Spec, Timing, build_plain_model, build_worker,
                          clock, interleave, make_batches, median, percentile, recorded, since, synchronize)
from bench.overhead import quiet_epoch, torch_threads
from torch.utils._python_dispatch import TorchDispatchMode
from trainer.worker import Worker

Patch = Callable[[Worker], contextlib.AbstractContextManager]


@dataclass
class OpCensus:
    """ATen ops per step on each side, and the Worker's charged to the trainer/ line that issued them."""

    worker: float
    plain: float
    worker_by_line: dict[str, float]


@dataclass
class Ablation:
    """Per variant: wall and CPU microseconds per step of every round; and the op census."""

    us_per_step: dict[str, list[float]]
    cpu_us_per_step: dict[str, list[float]]
    step_us: dict[str, list[float]]  # every single step, all rounds pooled
    ops: OpCensus
    optimizer_step: dict[str, list[Timing]]  # on the throughput case's model
    optimizer_model: str
    steps: int
    repeats: int


def measure(spec: Spec, big: Spec, workdir: Path, steps: int, repeats: int, threads: int = 1) -> Ablation:
    """Interleave every variant ``repeats`` times over ``steps`` tiny steps; time ``big``'s optimizer steps."""
    worker = build_worker(spec, workdir, "ablation", extra=["log.progress_bar=on"])
    runs: dict[str, Callable[[Sequence[Batch]], Timing]] = {
        f"worker{name}": _variant(worker, patch) for name, patch in WORKER_VARIANTS.items()}
    runs.update({
        "hand-written": PlainLoop(spec, worker.net).run,
        "hand-written + foreach SGD (as the Worker's)": PlainLoop(spec, worker.net, foreach=True).run,
        "hand-written + loss / 1 (as the Worker's)": PlainLoop(spec, worker.net, loss_divisor=1).run,
    })
    batches = make_batches(spec, steps)
    with torch_threads(threads):
        for run in runs.values():  # warm-up
            run(batches[: steps // 4])
        step_us: dict[str, list[float]] = {name: [] for name in runs}
        timings = interleave({name: recorded(run, batches, step_us[name]) for name, run in runs.items()}, repeats)
        census = op_census(worker, PlainLoop(spec, worker.net), batches[:100])
    return Ablation({n: [t.wall / steps * 1e6 for t in ts] for n, ts in timings.items()},
                    {n: [t.cpu / steps * 1e6 for t in ts] for n, ts in timings.items()}, step_us, census,
                    optimizer_steps(big, repeats=5), big.model, steps, repeats)


def optimizer_steps(spec: Spec, repeats: int, steps: int = 5) -> dict[str, list[Timing]]:
    """Time ``optimizer.step()`` alone on ``spec``'s model: PyTorch's default, foreach and fused SGD.

    The Worker asks for ``foreach`` off CUDA and ``fused`` on CUDA; the hand-written loop takes the
    default (a per-tensor for-loop for CPU tensors).
    """
    model = build_plain_model(spec).to(spec.device)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    kinds = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-6, momentum=MOMENTUM, nesterov=True,
                                        weight_decay=WEIGHT_DECAY, **kw) for name, kw in kinds.items()}

    def run(optimizer: torch.optim.Optimizer) -> Timing:
        synchronize(torch.device(spec.device))
        start = clock()
        for _ in range(steps):
            optimizer.step()
        synchronize(torch.device(spec.device))
        elapsed = since(start)
        return Timing(elapsed.wall / steps, elapsed.cpu / steps)

    for optimizer in optimizers.values():
        run(optimizer)
    return interleave({name: (lambda o=o: run(o)) for name, o in optimizers.items()}, repeats)


def _variant(worker: Worker, patch: Patch) -> Callable[[Sequence[Batch]], Timing]:
    def run(batches: Sequence[Batch]) -> Timing:
        with patch(worker):
            return quiet_epoch(worker, batches)
    return run


# ----------------------------------------------------------------------------- Worker patches
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
    """A TrainMeter whose per-step update does nothing."""

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None


def _no_bar(worker: Worker) -> contextlib.AbstractContextManager:
    return _setting(worker, "log.progress_bar", "off")


def _no_logging(worker: Worker) -> contextlib.AbstractContextManager:
    # Longer than an epoch, so nothing is logged; not huge: TrainMeter allocates a window this long.
    return _setting(worker, "log.every_steps", 100_000)


def _no_meter(worker: Worker) -> contextlib.AbstractContextManager:
    return mock.patch.object(trainer.worker, "TrainMeter", _NoOpMeter)


def _no_scheduler(worker: Worker) -> contextlib.AbstractContextManager:
    return mock.patch.object(worker.schedule, "set_window", lambda *args, **kwargs: None)


def _none_of_them(worker: Worker) -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    for patch in (_no_bar, _no_logging, _no_meter, _no_scheduler):
        stack.enter_context(patch(worker))
    return stack


WORKER_VARIANTS: dict[str, Patch] = {
    "": lambda worker: contextlib.nullcontext(),
    " without progress bar": _no_bar,
    " without metric logging": _no_logging,
    " without TrainMeter.update": _no_meter,
    " without schedule.set_window": _no_scheduler,
    " without all four": _none_of_them,
}


# ----------------------------------------------------------------------------- op census
class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops run under it, each charged to the innermost trainer/ source line."""

    def __init__(self) -> None:
        super().__init__()
        self.by_line: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        frame = sys._getframe(1)
        while frame is not None and f"{os.sep}trainer{os.sep}" not in frame.f_code.co_filename:
            frame = frame.f_back
        if frame is None:
            self.by_line["(outside trainer/)"] += 1
        else:
            path = Path(frame.f_code.co_filename)
            code = linecache.getline(str(path), frame.f_lineno).strip()
            self.by_line[f"{path.parent.name}/{path.name}:{frame.f_lineno} `{code}`"] += 1
        return func(*args, **(kwargs or {}))


def op_census(worker: Worker, plain: PlainLoop, batches: list[Batch]) -> OpCensus:
    """Count the ops of one epoch of ``batches`` on each side."""
    counters = {"worker": _OpCounter(), "plain": _OpCounter()}
    with counters["worker"]:
        quiet_epoch(worker, batches)
    with counters["plain"]:
        plain.run(batches)
    n = len(batches)
    lines = {line: count / n for line, count in counters["worker"].by_line.most_common() if count >= n / 10}
    return OpCensus(sum(counters["worker"].by_line.values()) / n, sum(counters["plain"].by_line.values()) / n,
                    lines)


def table(result: Ablation) -> list[str]:
    """Markdown lines: each variant's min CPU and median wall us/step, relative to the Worker."""
    def stats(name: str) -> tuple[float, float, float]:
        steps = result.step_us[name]
        return percentile(steps, 0.1), median(steps), min(result.cpu_us_per_step[name])

    base = stats("worker")
    lines = [f"Ablation: {result.repeats} interleaved rounds x {result.steps} tiny steps per variant. Per-step "
             "wall times pooled over rounds (p10, median: steady per-step cost, blind to the logging every 50 "
             "steps) and the minimum over rounds of whole-epoch CPU time per step (includes it); "
             "differences are to the Worker.", "",
             "| variant | step p10 us | vs Worker | step median us | vs Worker | epoch CPU us/step (min) | vs Worker |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in result.step_us:
        values = stats(name)
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f} | {v - b:+.1f}" for v, b in zip(values, base)) + " |")
    ops = result.ops
    lines += ["", f"ATen ops per step: Worker {ops.worker:.1f}, hand-written {ops.plain:.1f}. The Worker's, by "
              "source line (backward ops count on the backward() line):", "",
              "| ops/step | source line |", "|---:|---|"]
    lines += [f"| {n:.2f} | {line} |" for line, n in ops.worker_by_line.items()]
    lines += ["", f"optimizer.step() alone on {result.optimizer_model} (SGD, nesterov, weight decay): "
              + ", ".join(f"{name} {median([t.wall for t in ts]) * 1e3:.1f} ms wall / "
                          f"{min(t.cpu for t in ts) * 1e3:.1f} ms CPU" for name, ts in result.optimizer_step.items())]
    return lines
