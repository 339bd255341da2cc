"""Relay a stop signal to the workers torchrun runs in this process, and keep their exit codes.

torchrun's agent forwards a signal too, but then raises and drops the workers' exit codes, so a
run that saved and stopped (exit 3) would end as 128 + signal. This relay sends the signal to the
workers (this process's children), waits up to the shutdown timeout for them to save and exit,
reads their exit status without reaping them (``waitid`` with ``WNOWAIT``, so torchrun still reaps
its own children), SIGKILLs the ones still running, and then raises torchrun's own
``SignalException`` so the agent shuts down as it would have.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import FrameType

from torch.distributed.elastic.multiprocessing.api import SignalException

from trainer.errors import EXIT_FAILURE, EXIT_STOPPED


class StopRelay:
    """Installed for the trainer's stop signals around an in-process torchrun (Linux: reads /proc)."""

    def __init__(self, signals: list[str], shutdown_timeout_s: float) -> None:
        self.signals = signals
        self.shutdown_timeout_s = shutdown_timeout_s
        self.exit_codes: dict[int, int] = {}
        """pid -> exit code (negative: killed by that signal), filled after a stop."""
        self.killed: list[int] = []
        self._relaying = False

    @staticmethod
    def supported() -> bool:
        return Path("/proc/self/stat").exists() and hasattr(os, "waitid")

    def install(self) -> None:
        for name in self.signals:
            signal.signal(signal.Signals[name], self._handle)

    def exit_code(self, signum: int) -> int:
        """3 when every worker saved and stopped, a worker's own error code, else 128 + signal."""
        codes = list(self.exit_codes.values())
        failed = [code for code in codes if code not in (0, EXIT_STOPPED)]
        if failed:
            return next((code for code in failed if code > 0), EXIT_FAILURE)
        if EXIT_STOPPED in codes:
            return EXIT_STOPPED
        return 0 if codes else 128 + signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        workers = children(os.getpid())
        for pid in workers:
            _send(pid, signum)
        if self._relaying:  # a second signal while the first one's workers are saving: forwarded, no more
            return
        self._relaying = True
        deadline = time.monotonic() + self.shutdown_timeout_s
        running = set(workers)
        while running and time.monotonic() < deadline:
            for pid in list(running):
                code = _exit_status(pid)
                if code is not None:
                    self.exit_codes[pid] = code
                    running.discard(pid)
            time.sleep(0.05)
        for pid in running:
            _send(pid, signal.SIGKILL)
            self.exit_codes[pid] = -signal.SIGKILL
        self.killed = sorted(running)
        raise SignalException(f"Process {os.getpid()} got signal: {signal.Signals(signum).name}",
                              sigval=signal.Signals(signum))


def children(parent: int) -> list[int]:
    """The live child processes of ``parent`` (the launcher's: the workers torchrun started)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _exit_status(pid: int) -> int | None:
    """The exit code of child ``pid`` (negative signal number if killed), None while it runs; not reaped."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return EXIT_FAILURE  # already reaped by someone else: its code is lost
    if info is None or info.si_pid == 0:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
