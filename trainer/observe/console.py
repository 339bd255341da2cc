"""Rank-aware console logging, each rank's log file, and the progress bar."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path
from typing import Any

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
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return path


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
