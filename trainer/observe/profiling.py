"""``log.profile_steps=FIRST-LAST``: a torch.profiler trace of those optimizer steps, one per rank."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("trainer")


class StepProfiler:
    """Starts ``torch.profiler`` before optimizer step FIRST and writes its Chrome/Perfetto trace
    after step LAST to ``run_dir/profile/rank_<r>_steps_<FIRST>-<LAST>.json``.

    :meth:`update` is the only call in the training loop: an integer comparison when idle.
    ``quiesce`` runs before the profiler starts or stops: it must leave no collective in flight.
    """

    def __init__(self, steps: tuple[int, int] | None, rank: int, device: torch.device, run_dir: Path,
                 quiesce: Callable[[], None]) -> None:
        self.steps, self.rank, self.device, self.quiesce = steps, rank, device, quiesce
        self.folder = run_dir / "profile"
        self.active: Any = None
        self.done = steps is None

    def update(self, steps_done: int) -> None:
        """Call before each batch with the number of optimizer steps done so far."""
        if self.done:
            return
        first, last = self.steps  # type: ignore[misc]
        if self.active is None and first - 1 <= steps_done < last:
            self._start()
        elif self.active is not None and steps_done >= last:
            self.close()

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.active = torch.profiler.profile(activities=activities)
        self.quiesce()
        self.active.__enter__()

    def close(self) -> None:
        """Stop and write the trace (also when the run ends inside the window)."""
        if self.active is None:
            return
        first, last = self.steps  # type: ignore[misc]
        self.quiesce()
        self.active.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank_{self.rank}_steps_{first}-{last}.json"
        self.active.export_chrome_trace(str(path))
        self.active, self.done = None, True
        log.info("profiler: steps %d-%d recorded, one trace per rank: %s (open in https://ui.perfetto.dev "
                 "or chrome://tracing)", first, last, self.folder / f"rank_*_steps_{first}-{last}.json")
