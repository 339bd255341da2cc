"""Stragglers: the rank the others wait for, named with where its time goes.

DDP's gradient all-reduce evens out step times: every rank's step lasts as long as the slowest
rank's, so the slow rank is not the one with the longest step but the one whose *own* time is the
longest. A rank's own time per step is what it spends before it can take part in the step's
collectives: waiting for its loader (data wait) plus running the model (compute), without the
time it waits for its peers. :class:`OwnTime` measures it with no host-device sync per step, and
:class:`StragglerWatch` gathers every rank's numbers over the gloo control group once per
reporting interval and names the rank whose own time exceeds the median rank's by
``log.straggler_ratio`` in two consecutive intervals.
"""

from __future__ import annotations

import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.observe.console import log
from trainer.parallel.distributed import DistEnv, all_gather_objects

CONSECUTIVE = 2
"""Intervals in a row over the ratio before a rank is named: one slow interval (a page-cache
miss, a garbage collection, a neighbour's burst on a shared host) is not a straggler."""

PER_RANK_SERIES_UP_TO = 64
"""Above this many ranks, only the named ranks get series of their own (plus the median and the
slowest): thousands of series per interval would swamp the trackers."""


class OwnTime:
    """This rank's data wait and compute per optimizer step, over the current reporting interval.

    Data wait is host time blocked on the loader (``next(loader)``): when it is long the rank's
    device idles, whatever the device. Compute runs from the start of the model's forward pass to
    its last gradient: :meth:`attach` hooks both ends, so DDP's buffer broadcast before the forward
    is not counted, nor is the wait for the peers in the gradient all-reduce (launched bucket by
    bucket during the backward, waited for at its end), nor the optimizer step after it (the same
    work on every rank). The last gradient is taken to be the first trainable parameter's, in
    registration order: the backward reaches the model's first layer last. On CUDA the two ends
    are CUDA events, read once per interval, when the loss meter reads the device anyway: host
    timestamps would measure kernel launches, not the device's work. The device copy and
    normalisation before the forward count in neither (small, and on CUDA asynchronous).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.waits: list[float] = []  # per optimizer step of the interval, seconds
        self.computes: list[float] = []  # per step, host clock (CPU)
        self._wait = self._compute = 0.0  # the step in progress
        self._start: float | None = None  # host clock: the micro-batch's forward began
        self._end: float | None = None  # host clock: its last gradient was computed
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA: kept from interval to interval
        self._event_steps: list[int] = []  # CUDA: the step (index in the interval) of each pair used
        self._open = False  # CUDA: the next pair has its start recorded
        self._closed = False  # CUDA: ... and its end

    def attach(self, net: nn.Module, compiled: bool) -> None:
        """Start the compute clock at ``net``'s forward pass and stop it at its last gradient (both
        hooks kept out of torch.compile's graphs): one Python call each per micro-batch."""
        def guard(hook: Any) -> Any:
            return torch.compiler.disable(hook) if compiled else hook

        net.register_forward_pre_hook(guard(self._forward_starts))
        first = next((param for param in net.parameters() if param.requires_grad), None)
        if first is not None:
            first.register_post_accumulate_grad_hook(guard(self._last_gradient))

    def waited(self, seconds: float) -> None:
        """The loader kept this rank waiting ``seconds`` for a micro-batch."""
        self._wait += seconds

    def micro_batch_starts(self) -> None:
        self._start = self._end = None
        self._open = self._closed = False

    def _forward_starts(self, module: nn.Module, args: Any) -> None:
        if self._start is not None or self._open:  # checkpointed blocks rerun parts of the forward
            return
        if not self.cuda:
            self._start = time.perf_counter()
            return
        if len(self._event_steps) == len(self._events):
            self._events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
        self._events[len(self._event_steps)][0].record()
        self._open = True

    def _last_gradient(self, param: torch.Tensor) -> None:
        """The backward is done on this rank: what follows is the wait for the all-reduce."""
        if not self.cuda:
            self._end = time.perf_counter()
        elif self._open:
            self._events[len(self._event_steps)][1].record()
            self._closed = True

    def micro_batch_ends(self, optimizer_step: bool) -> None:
        """After the micro-batch's backward (and optimizer step): close its compute time."""
        if not self.cuda and self._start is not None:
            self._compute += (self._end if self._end is not None else time.perf_counter()) - self._start
        elif self._open:
            if not self._closed:
                self._events[len(self._event_steps)][1].record()
            self._event_steps.append(len(self.waits))
        if optimizer_step:
            self.waits.append(self._wait)
            self.computes.append(self._compute)
            self._wait = self._compute = 0.0

    def take(self) -> tuple[float, float, float]:
        """Over the optimizer steps since the last call: the median step's own time (data wait plus
        compute), the mean data wait and the mean compute per step, in seconds (zeros if none).
        Starts the next interval. On CUDA this waits for the interval's last event: call it where
        the host waits anyway.

        The median step, so that one step held up by something else (a garbage collection, the
        process descheduled on a busy host) does not make a straggler.
        """
        if self._event_steps:
            self._events[len(self._event_steps) - 1][1].synchronize()  # every earlier event is done too
            for (start, end), step in zip(self._events, self._event_steps):
                self.computes[step] += start.elapsed_time(end) / 1000
            self._event_steps.clear()
        waits, computes = self.waits, self.computes
        self.waits, self.computes = [], []
        if not waits:
            return 0.0, 0.0, 0.0
        own = statistics.median(wait + compute for wait, compute in zip(waits, computes))
        return own, statistics.fmean(waits), statistics.fmean(computes)


class Streaks:
    """Which ranks are stragglers, interval after interval, from every rank's own time per step.

    A rank is named when its own time exceeds ``ratio`` times the median rank's in
    :data:`CONSECUTIVE` intervals in a row, and stays named until an interval where it does not.
    With two ranks the median is their mean, so one is named at ``ratio / (2 - ratio)`` times the other.
    """

    def __init__(self, world_size: int, ratio: float) -> None:
        self.ratio = ratio
        self.runs = [0] * world_size  # intervals in a row over the ratio, per rank
        self.named: set[int] = set()

    def judge(self, own: list[float]) -> tuple[float, list[int], list[int]]:
        """The median, the ranks named now and the ranks that keep up again."""
        median = statistics.median(own)
        named, recovered = [], []
        for rank, seconds in enumerate(own):
            slow = median > 0 and seconds > self.ratio * median
            self.runs[rank] = self.runs[rank] + 1 if slow else 0
            if self.runs[rank] == CONSECUTIVE:
                self.named.add(rank)
                named.append(rank)
            elif not slow and rank in self.named:
                self.named.discard(rank)
                recovered.append(rank)
        return median, named, recovered


class StragglerWatch:
    """Every rank's own time per step, gathered once per interval; stragglers named on rank 0.

    :meth:`report` is a collective on the control group (one all-gather of three numbers per
    rank): every rank calls it at the same steps.
    """

    def __init__(self, env: DistEnv, ratio: float, clock: OwnTime) -> None:
        self.env, self.clock = env, clock
        self.hosts: list[str] = all_gather_objects(env, socket.gethostname())
        self.streaks = Streaks(env.world_size, ratio)

    def report(self, step: int) -> dict[str, float]:
        """Gather the interval's numbers and judge them; the series for the sinks (rank 0; empty elsewhere)."""
        numbers = torch.tensor(self.clock.take(), dtype=torch.float64)
        gathered = [torch.empty_like(numbers) for _ in range(self.env.world_size)]
        dist.all_gather(gathered, numbers, group=self.env.control)
        if not self.env.is_main:
            return {}
        own, waits, computes = (list(column) for column in zip(*(row.tolist() for row in gathered)))
        median, named, recovered = self.streaks.judge(own)
        for rank in named:
            log.warning("straggler: rank %d (%s) takes %.1f ms per step of its own, %.2fx the median rank's "
                        "%.1f ms: on average %.1f ms waiting for data, %.1f ms computing (steps up to %d)",
                        rank, self.hosts[rank], 1000 * own[rank], own[rank] / median, 1000 * median,
                        1000 * waits[rank], 1000 * computes[rank], step)
        for rank in recovered:
            log.info("straggler: rank %d (%s) keeps up again: %.1f ms per step, median %.1f ms (steps up to %d)",
                     rank, self.hosts[rank], 1000 * own[rank], 1000 * median, step)
        values = {"ranks/own_ms_median": 1000 * median, "ranks/own_ms_max": 1000 * max(own),
                  "ranks/stragglers": float(len(self.streaks.named))}
        for rank, (wait, compute) in enumerate(zip(waits, computes)):
            if self.env.world_size <= PER_RANK_SERIES_UP_TO or rank in self.streaks.named:
                values[f"ranks/own_ms/rank_{rank}"] = 1000 * own[rank]
                values[f"ranks/data_wait_ms/rank_{rank}"] = 1000 * wait
                values[f"ranks/compute_ms/rank_{rank}"] = 1000 * compute
        return values
