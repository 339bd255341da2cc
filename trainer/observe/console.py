"""Rank-aware console logging, each rank's log file, and the progress bar."""

from __future__ import annotations

import logging
import socket
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

from trainer.errors import disk_problem
from trainer.parallel.distributed import DistEnv

log = logging.getLogger("trainer")


def setup_console(rank: int, debug: bool = False) -> None:
    """Rank 0 prints INFO to stdout and warnings to stderr; other ranks print only warnings and
    errors, prefixed ``host:rank``."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    if rank == 0:
        info = logging.StreamHandler(sys.stdout)
        info.addFilter(lambda record: record.levelno < logging.WARNING)
        info.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(info)
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter(f"[{socket.gethostname()}:{rank}] %(levelname)s %(message)s"))
    log.addHandler(handler)


def add_rank_file(run_dir: Path, rank: int) -> Path:
    """Also keep this rank's full log (INFO and up, timestamped) in ``run_dir/logs/rank_<r>.log``."""
    path = run_dir / "logs" / f"rank_{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = RankFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return path


class RankFileHandler(logging.FileHandler):
    """A rank's log file that, when a write fails (a full or read-only disk), closes with one
    warning naming the disk and lets the run go on with the console, instead of printing
    logging's traceback for every later line."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a")
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
            return
        self.failed = True
        if self.stream is not None:
            with suppress(OSError):
                self.stream.close()  # its unwritten buffer goes with it
            self.stream = None  # type: ignore[assignment]
        log.warning("the log file %s is off for the rest of this run: writing failed (%s); training goes on",
                    self.baseFilename, disk_problem(exc, Path(self.baseFilename)))


class ProgressBar:
    """A tqdm bar on rank 0 (``auto``: only when stderr is a terminal); a no-op elsewhere."""

    def __init__(self, env: DistEnv, mode: str, total: int, desc: str) -> None:
        enabled = env.is_main and (mode == "on" or (mode == "auto" and sys.stderr.isatty()))
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
