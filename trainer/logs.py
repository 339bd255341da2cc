"""Rank-aware console logging, the progress bar, and the rank-0 metric sinks (TensorBoard, JSONL)."""

from __future__ import annotations

import json
import logging
import socket
import sys
from pathlib import Path
from typing import Any

from trainer.distributed import DistEnv

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


class MetricSinks:
    """Rank 0's TensorBoard writer and JSON-lines file; every method is a no-op on other ranks.

    The writer (and the TensorBoard import, a few hundred ms) is opened at the first write, so
    it never delays the first training step; text logged before then is written first.
    """

    def __init__(self, env: DistEnv, run_dir: Path, tensorboard: bool, purge_step: int | None = None) -> None:
        self.enabled = env.is_main
        self.purge_step = purge_step  # a resumed run drops the events a killed run logged after its checkpoint
        self.tensorboard = self.enabled and tensorboard
        self.tensorboard_dir = str(run_dir / "tensorboard") if self.tensorboard else None
        self.jsonl_path = run_dir / "metrics.jsonl"
        self.pending_text: list[tuple[str, str]] = []
        self._writer: Any = None

    def writer(self) -> Any:
        """The SummaryWriter, opened on first use (None when TensorBoard is off or not rank 0)."""
        if self._writer is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.tensorboard_dir, purge_step=self.purge_step)
            for tag, text in self.pending_text:
                self._writer.add_text(tag, text, 0)
        return self._writer

    def config_text(self, yaml_text: str) -> None:
        if self.tensorboard:
            self.pending_text.append(("config", "```yaml\n" + yaml_text + "\n```"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if (writer := self.writer()) is not None:
            for name, value in values.items():
                writer.add_scalar(name, value, step)

    def epoch(self, record: dict[str, Any], step: int) -> None:
        """Write one epoch's reduced metrics to TensorBoard and append them to metrics.jsonl."""
        if not self.enabled:
            return
        self.scalars({k: v for k, v in record.items() if "/" in k and isinstance(v, (int, float))}, step)
        with open(self.jsonl_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def hparams(self, hparams: dict[str, Any], final: dict[str, float]) -> None:
        """Record the run's hyper-parameters and final metrics in the same event file."""
        if (writer := self.writer()) is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        for summary in hparams_summary(clean, final):
            writer.file_writer.add_summary(summary)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
