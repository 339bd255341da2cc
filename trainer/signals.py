"""Stop signals (SIGTERM, SIGINT, the SLURM warning signal) turned into a flag the loop polls."""

from __future__ import annotations

import signal
from types import FrameType


class StopRequest:
    """Set by a signal handler; the Worker checks it at step boundaries, saves and exits."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self, names: list[str]) -> None:
        """Handle each named signal (e.g. ``["SIGTERM", "SIGINT", "SIGUSR1"]``) by setting the flag."""
        for name in names:
            signal.signal(signal.Signals[name], self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # No logging here: the handler may interrupt code that holds the logging lock.
        self.signal_name = signal.Signals(signum).name
