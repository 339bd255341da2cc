"""The real trainer, except that the filesystem under the run directory is full during one write.

Just before the FULL_DURING_CALL-th call (default 1) of the write FULL_DURING names (``jsonl``:
a metrics.jsonl line; ``per_class``: per_class.json), a filler file takes every free byte of
that file's filesystem, and it is deleted when the call ends (as another job's temporary files
would come and go). As on any full disk, a write that fits in the file's last, partly used block
still succeeds: the first metrics.jsonl line fails, a second usually does not. Used by
tests/test_faults.py; the product code has no hook for this: we wrap those methods. It refuses
to fill a filesystem over 256 MiB (the tests mount a small tmpfs).

    FULL_DURING=jsonl python tests/full_disk_worker.py key=value ...
"""

import errno
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from trainer.__main__ import main  # noqa: E402
from trainer.observe import trackers, visuals  # noqa: E402

LARGEST_FILLED = 256 << 20
TARGET = os.environ.get("FULL_DURING", "")
CALL = int(os.environ.get("FULL_DURING_CALL", "1"))
calls = 0


def fill(folder: Path) -> Path:
    """A file in ``folder`` that takes every free byte of its filesystem."""
    fs = os.statvfs(folder)
    if fs.f_blocks * fs.f_frsize > LARGEST_FILLED:
        raise RuntimeError(f"full_disk_worker: {folder} is on a filesystem over 256 MiB; mount a small tmpfs")
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as file:
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    file.write(bytes(chunk))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


def full_during(method, folder_of):  # type: ignore[no-untyped-def]
    def wrapped(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        global calls
        calls += 1
        if calls != CALL:
            return method(self, *args, **kwargs)
        filler = fill(folder_of(self))
        try:
            return method(self, *args, **kwargs)
        finally:
            filler.unlink()
    return wrapped


if TARGET == "jsonl":
    trackers.JsonlSink.epoch = full_during(trackers.JsonlSink.epoch, lambda sink: sink.path.parent)
elif TARGET == "per_class":
    visuals.RunVisuals._write_per_class = full_during(visuals.RunVisuals._write_per_class,
                                                      lambda shown: shown.per_class_path.parent)
elif TARGET:
    raise SystemExit(f"full_disk_worker: FULL_DURING={TARGET!r}; use jsonl or per_class")

if __name__ == "__main__":
    main()
