"""Replacing a file as a whole: a reader, or a crash at any moment, sees the old file or the new
one, never half of one (checkpoints, metrics.jsonl, the image index, per-class metrics); and
appending to one whole or not at all."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO


def temporary_name(path: Path) -> Path:
    """Where ``path``'s next version is written first: the same folder (so the rename is atomic),
    hidden, and named after this process (so a killed writer's leftovers can be told apart)."""
    return path.with_name(f".{path.name}{_own_suffix()}")


def leftovers(folder: Path) -> list[Path]:
    """Temporary files in ``folder`` that other, killed writers left (never this process's own)."""
    return [p for p in folder.glob(".*.tmp.*") if not p.name.endswith(_own_suffix())]


def _own_suffix() -> str:
    return f".tmp.{os.getpid()}"


@contextmanager
def replacing(path: Path, durable: bool = False) -> Iterator[BinaryIO]:
    """A binary file whose bytes replace ``path`` when the block ends without an error; on an error
    ``path`` is untouched and the partial file removed. ``durable`` also fsyncs the file and the
    folder, so the new version survives a power loss (checkpoints, not logs)."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as file:
            yield file
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(path.parent)


def append(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` (created if absent) whole or not at all: when a write fails
    part-way (a full disk), the file is cut back to its old length before the error goes on."""
    with open(path, "ab", buffering=0) as file:
        start = file.tell()
        try:
            done = 0
            while done < len(data):
                done += file.write(data[done:]) or 0
        except OSError:
            with suppress(OSError):
                file.truncate(start)
            raise


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems cannot open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
