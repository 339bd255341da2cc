"""Stop signals (SIGTERM, SIGINT, the SLURM warning signal) turned into a flag the loop polls."""

from __future__ import annotations

import signal
from types import FrameType


class StopRequest:
    """Set by a signal handler; the Worker checks it at step boundaries, saves and exits.

    Every signal received is kept: SLURM sends the warning signal and, at the time limit, SIGTERM;
    whether to requeue depends on whether the warning came at all, not on which came last.
    """

    def __init__(self) -> None:
        self.received: list[str] = []

    @property
    def requested(self) -> bool:
        return bool(self.received)

    @property
    def signal_name(self) -> str | None:
        """The first signal received, if any."""
        return self.received[0] if self.received else None

    def install(self, names: list[str]) -> None:
        """Handle each named signal (e.g. ``["SIGTERM", "SIGINT", "SIGUSR1"]``) by setting the flag."""
        for name in names:
            signal.signal(signal.Signals[name], self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # No logging here: the handler may interrupt code that holds the logging lock.
        name = signal.Signals(signum).name
        if name not in self.received:
            self.received.append(name)
