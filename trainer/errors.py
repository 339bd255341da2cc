"""Errors a user can fix, and the process exit codes the Worker documents."""

from __future__ import annotations

import errno
import os
from pathlib import Path

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_STOPPED = 3
"""Stopped by a signal (SIGTERM, SIGINT, the SLURM warning signal) after saving a checkpoint."""
EXIT_HANG = 4
"""A collective did not complete in time: the hang's verdict was printed (trainer/parallel/hangs.py)."""


class UserError(Exception):
    """A mistake in the config, data, checkpoint or environment, reported as one actionable line."""


class ConfigError(UserError):
    """An unknown key, a wrong type or an invalid value in the configuration."""


class DataError(UserError):
    """A data set that is missing, malformed or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, unsafe or does not match the model."""


class StorageError(UserError):
    """A file the run must keep (metrics.jsonl) could not be written: a full disk, a quota, a
    read-only or failing filesystem (the message names the filesystem and what to do)."""


class EnvironmentProblem(UserError):
    """The machine cannot do what the config asks (absent device, too many processes...)."""


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite (the message names the step)."""


class OutOfMemory(UserError):
    """The device ran out of memory in a training step (the message names the batch size)."""


def first_line(cause: BaseException | str) -> str:
    """The first non-blank line of an exception's (or a text's) message, for a one-line error;
    an exception with an empty message gives its type's name."""
    text = str(cause)
    found = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return found or (type(cause).__name__ if isinstance(cause, BaseException) else "")


def one_line(exc: BaseException) -> str:
    """The message of ``exc``, also when a DataLoader worker re-raised it with its traceback."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    qualified = f"{type(exc).__module__}.{type(exc).__name__}: "
    return last[len(qualified):] if last.startswith(qualified) else last


def disk_problem(exc: OSError, path: Path) -> str:
    """Why writing ``path`` failed, naming the filesystem it lives on (what a user frees or
    fixes), e.g. ``No space left on device on /mnt/runs, 1.4 MiB of 4.5 MiB free``."""
    mount = mount_point(path)
    reason = f"{exc.strerror or first_line(exc)} on {mount}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            fs = os.statvfs(mount)
            reason += f", {_size(fs.f_bavail * fs.f_frsize)} of {_size(fs.f_blocks * fs.f_frsize)} free"
        except OSError:
            pass
    return reason


def disk_fix(exc: OSError) -> str:
    """What to do about ``exc`` on that filesystem, before running again."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space there"
    if exc.errno == errno.EROFS:
        return "make it writable"
    return "check that filesystem"


def stopped_by_write(what: str, exc: OSError, path: Path) -> str:
    """The one line of a run stopped because ``what`` could not be written (a checkpoint, metrics.jsonl)."""
    return (f"could not write {what} ({disk_problem(exc, path)}); the previous checkpoint is untouched: "
            f"{disk_fix(exc)} and run the same command again (ckpt.resume=auto continues from it)")


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem ``path`` (or its nearest existing parent) is on."""
    found = Path(os.path.abspath(path))
    while not found.exists() and found != found.parent:
        found = found.parent
    found = found.resolve()
    while not os.path.ismount(found):
        found = found.parent
    return found


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            break
        count /= 1024
    else:
        unit = "TiB"
    return f"{count:.0f} B" if unit == "B" else f"{count:.1f} {unit}"
