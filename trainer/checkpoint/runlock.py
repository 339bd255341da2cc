"""One run per run directory: a lock file naming the holder's host and PID.

Rank 0 of a job takes it before anything is read or written in the directory, and removes it
when the job ends; the other ranks of the job never look at it. A lock whose holder is dead
(same host, no such process) is taken over, so a killed or requeued run resumes without help.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from trainer.errors import UserError

LOCK_NAME = "run.lock"


class RunDirectoryBusy(UserError):
    """Another live run holds the run directory."""


class RunLock:
    """The lock this process holds on a run directory.

    Taking and dropping it creates and removes a file, which moves the directory's mtime; when
    nothing else changed the directory meanwhile (a start refused for another reason), release
    puts that mtime back, so a refused start leaves the directory exactly as it was.
    """

    def __init__(self, path: Path, dir_times_before: tuple[int, int]) -> None:
        self.path, self.dir_times_before = path, dir_times_before
        self.dir_mtime_locked = path.parent.stat().st_mtime_ns

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        if _read(self.path) != _me():
            return
        untouched = self.path.parent.stat().st_mtime_ns == self.dir_mtime_locked
        self.path.unlink(missing_ok=True)
        if untouched:
            os.utime(self.path.parent, ns=self.dir_times_before)


def acquire(run_dir: Path) -> RunLock:
    """Take ``run_dir``'s lock or raise :class:`RunDirectoryBusy` naming its holder."""
    path = run_dir / LOCK_NAME
    before = run_dir.stat()
    tmp = path.with_name(f".{LOCK_NAME}.{os.getpid()}")
    tmp.write_text(json.dumps(_me()))  # complete before it appears: os.link makes it the lock atomically
    try:
        for _ in range(2):  # a stale lock is removed once, then taken afresh
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                holder = _read(path)
                if holder is not None and _alive(holder):
                    raise RunDirectoryBusy(
                        f"{run_dir} is in use by another run (pid {holder['pid']} on {holder['host']}, see {path}); "
                        "wait for it, choose another log.name, or delete the lock file if that run is gone") from None
                path.unlink(missing_ok=True)
        else:
            raise RunDirectoryBusy(f"{run_dir}: another run took {path} at the same moment; choose another log.name")
    finally:
        tmp.unlink(missing_ok=True)
    return RunLock(path, (before.st_atime_ns, before.st_mtime_ns))


def _me() -> dict[str, str | int | None]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": _job_id()}


def _job_id() -> str | None:
    """The scheduler's job id: a requeued job keeps it, so its own old lock is not another run's."""
    return os.environ.get("SLURM_JOB_ID")


def _read(path: Path) -> dict | None:
    """The holder recorded in ``path``; None when it is gone or unreadable (a writer killed mid-write,
    or bytes that name no host and process)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("host"), str) or type(holder.get("pid")) is not int:
        return None
    return holder if 0 < holder["pid"] < 2**31 else None


def _alive(holder: dict) -> bool:
    """Whether the holder still runs; a holder on another host is assumed alive (it cannot be
    checked) unless it is an earlier attempt of this very job (a SLURM requeue)."""
    if holder.get("job") is not None and holder.get("job") == _job_id():
        return holder["host"] == socket.gethostname() and _pid_alive(int(holder["pid"]))
    if holder["host"] != socket.gethostname():
        return True
    return _pid_alive(int(holder["pid"]))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a lock naming this very process is its own leftover (e.g. a restarted start-up)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True
