"""End the ranks a hang verdict names as not answering, instead of leaving them to torchrun's wait.

A rank stopped (SIGSTOP, a debugger) or wedged cannot exit by itself: after the others print the
verdict and exit, torchrun's agent sends it SIGTERM and waits its own 30 s before SIGKILL. This
thread reads each worker's torchrun error file, where the ranks that decide write the verdict
(trainer/parallel/hangs.py ``tell_torchrun``), and SIGKILLs at once the ranks it names as not
answering that run on this host: only processes whose parent is this launcher (the workers of its
in-process torchrun), with their own children (loader workers). torchrun then finishes as usual.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
from pathlib import Path

from launcher.relay import children

SILENT_RANK = re.compile(r"rank (\d+) \(node \d+, (\S+) pid (\d+)\) did not answer")
"""How a verdict names a rank that did not answer, its host and its pid."""
POLL_S = 0.5


class HangReaper:
    """A daemon thread around an in-process torchrun (Linux: reads /proc)."""

    def __init__(self) -> None:
        self._error_files: dict[int, str] = {}  # worker pid -> its TORCHELASTIC_ERROR_FILE
        self._handled: set[str] = set()  # error files whose verdict was acted on (a restart writes new ones)
        self._killed: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hang-reaper", daemon=True)

    def start(self) -> None:
        if Path("/proc/self/environ").exists():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        me = os.getpid()
        while not self._stop.wait(POLL_S):
            workers = children(me)
            for pid in workers:
                if pid not in self._error_files:  # read while it lives: a dead one's environment is gone
                    self._error_files[pid] = _error_file(pid) or ""
            for path in set(self._error_files.values()) - self._handled - {""}:
                if (verdict := _verdict(path)) is not None:
                    self._handled.add(path)
                    self._kill_silent(verdict, set(workers))

    def _kill_silent(self, verdict: str, workers: set[int]) -> None:
        host = socket.gethostname()
        for rank, named_host, pid in SILENT_RANK.findall(verdict):
            if named_host != host or int(pid) not in workers or int(pid) in self._killed:
                continue
            self._killed.add(int(pid))
            for process in [*children(int(pid)), int(pid)]:
                try:
                    os.kill(process, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sys.stderr.write(f"launcher: killed rank {rank} (pid {pid}), which did not answer the hang report\n")
            sys.stderr.flush()


def _error_file(pid: int) -> str | None:
    """The torchrun error file of worker ``pid``, from its environment."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = b"TORCHELASTIC_ERROR_FILE="
    return next((item[len(prefix):].decode() for item in environ if item.startswith(prefix)), None)


def _verdict(path: str) -> str | None:
    """The hang verdict a worker wrote to its error file, if any."""
    try:
        message = json.loads(Path(path).read_text())["message"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    text = message.get("message") if isinstance(message, dict) else message
    return text if isinstance(text, str) and text.startswith("hang: ") else None
