"""Shared pieces: interleaved rounds, medians and the results-table row."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Sequence, TypeVar

T = TypeVar("T")


class Timing(NamedTuple):
    """One timed run in this process: wall-clock seconds and CPU seconds (all its threads).

    On a shared machine CPU time is the steadier of the two: it does not count waiting for a core.
    """

    wall: float
    cpu: float


def clock() -> Timing:
    """Both clocks now; subtract two readings with :func:`since`."""
    return Timing(time.perf_counter(), time.process_time())


def since(start: Timing) -> Timing:
    now = clock()
    return Timing(now.wall - start.wall, now.cpu - start.cpu)


def interleave(runs: Mapping[str, Callable[[], T]], repeats: int) -> dict[str, list[T]]:
    """Call every run once per round, ``repeats`` rounds; each round starts one run later (A B, B A, ...).

    Rotating the order cancels drift in the machine's load; returns each run's values in order.
    """
    names = list(runs)
    values: dict[str, list[T]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            values[name].append(runs[name]())
    return values


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


@dataclass
class Row:
    """One line of the results table: the Worker's median vs a baseline's median, and the goal."""

    case: str
    metric: str
    worker: float
    baseline: float
    baseline_name: str
    goal: float | None  # None: reported, no goal
    higher_is_better: bool
    pair_ratios: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def ratio(self) -> float:
        """The median of the per-round ratios (each round's two runs were timed back to back)."""
        return statistics.median(self.pair_ratios) if self.pair_ratios else self.ratio_of_medians

    @property
    def ratio_of_medians(self) -> float:
        return self.worker / self.baseline

    @property
    def ok(self) -> bool:
        """Goal met (always true for a row that is only reported, ``goal=None``)."""
        if self.goal is None:
            return True
        return self.ratio >= self.goal if self.higher_is_better else self.ratio <= self.goal

    @property
    def goal_text(self) -> str:
        return "-" if self.goal is None else f"{'>=' if self.higher_is_better else '<='} {self.goal:g}"

    @property
    def verdict(self) -> str:
        return "reported" if self.goal is None else "ok" if self.ok else "MISSED"


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Round-by-round ratios a/b: their spread shows how noisy the machine was."""
    return [x / y for x, y in zip(a, b)]
