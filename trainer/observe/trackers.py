"""Where a run's metrics and pictures go: one small interface (:class:`Sink`), the local sinks
(TensorBoard, JSON lines), and :class:`BackgroundSink` for the others.

wandb, MLflow (trainer.observe.hosted) and the user's sinks run behind :class:`BackgroundSink`:
their calls queue to a thread of their own, so a slow disk, a slow server or a hanging client
never stalls a training step, and a failure is one warning line, after which the run goes on
with the other sinks. TensorBoard runs behind :class:`GuardedSink`, which turns it off the same
way when a write fails (a full disk). metrics.jsonl is the run's history: a line it cannot write
stops the run.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import warnings
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainer.checkpoint import atomic
from trainer.errors import StorageError, disk_problem, stopped_by_write

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("trainer")

CLOSE_WAIT_S = 120.0
"""How long the end of a run waits for a tracker to write what it was given."""


@dataclass(frozen=True)
class Histogram:
    """A histogram, computed once and handed to every sink."""

    counts: np.ndarray  # (bins,)
    edges: np.ndarray  # (bins + 1,)
    min: float
    max: float
    num: int
    sum: float
    sum_squares: float

    @classmethod
    def of(cls, values: torch.Tensor, bins: int = 64) -> Histogram | None:
        """The histogram of ``values``' finite entries (None if there are none)."""
        flat = values.detach().float().flatten().cpu()
        flat = flat[torch.isfinite(flat)]
        if flat.numel() == 0:
            return None
        low, high = flat.min().item(), flat.max().item()
        counts, edges = torch.histogram(flat, bins=bins, range=(low, high if high > low else low + 1e-12))
        return cls(counts.numpy(), edges.numpy(), low, high, flat.numel(), flat.sum().item(),
                   flat.square().sum().item())


class Sink:
    """One destination of the run's records. Each method does nothing unless a sink overrides it.

    Rank 0 calls :meth:`open` once, then the logging methods, then :meth:`finish` if the run
    completed, then :meth:`close` always. ``step`` is the global optimizer step.
    """

    name = "sink"

    def open(self, config: dict[str, Any], config_yaml: str, resume_id: str | None, step: int) -> None:
        """Start (or, with the ``resume_id`` a checkpoint kept, continue) this sink's run, from
        global step ``step`` (0 for a new run)."""

    def run_id(self) -> str | None:
        """The id under which a resumed run continues this sink's run (None: nothing to continue)."""
        return None

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Running values within an epoch (loss, learning rate)."""

    def epoch(self, record: dict[str, Any], step: int) -> None:
        """One epoch's reduced metrics; by default its ``group/name`` numbers, as scalars."""
        self.scalars({k: v for k, v in record.items() if "/" in k and isinstance(v, (int, float))}, step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        """An RGB picture (confusion matrix, sample grids)."""

    def table(self, tag: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A small table (per-class metrics, top confusions)."""

    def histogram(self, tag: str, histogram: Histogram, step: int) -> None:
        """A weight or gradient histogram."""

    def graph(self, model: torch.nn.Module, example: torch.Tensor) -> None:
        """The model's graph, traced on ``example``."""

    def finish(self, hparams: dict[str, Any], final: dict[str, float]) -> None:
        """The run completed: its flattened config and final metrics."""

    def close(self) -> None:
        """Write out everything and release files and processes."""


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """``rows`` as a Markdown table (numbers to 4 decimals), as TensorBoard's text tab shows it."""
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class TensorBoardSink(Sink):
    """One SummaryWriter in ``run_dir/tensorboard``.

    The writer (and the TensorBoard import, a few hundred ms) opens at the first scalar, so it
    never delays the first training step; what comes before waits in a list and is written then.
    """

    name = "tensorboard"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.writer: Any = None
        self.pending: list[tuple[str, tuple[Any, ...]]] = []
        self.purge_step: int | None = None

    def _open_writer(self) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_event_writer_threads()
            self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=self.purge_step)
            for method, args in self.pending:
                getattr(self.writer, method)(*args)
            self.pending.clear()
        return self.writer

    def _write(self, method: str, *args: Any) -> None:
        if self.writer is None:
            self.pending.append((method, args))
        else:
            getattr(self.writer, method)(*args)

    def open(self, config: dict[str, Any], config_yaml: str, resume_id: str | None, step: int) -> None:
        self.purge_step = step + 1  # one history: drop what a killed run logged after its checkpoint
        self._write("add_text", "config", "```yaml\n" + config_yaml + "\n```", 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        writer = self._open_writer()
        for name, value in values.items():
            writer.add_scalar(name, value, step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        self._write("add_image", tag, np.asarray(image.convert("RGB")), step, None, "HWC")

    def table(self, tag: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self._write("add_text", tag, markdown_table(columns, rows), step)

    def histogram(self, tag: str, histogram: Histogram, step: int) -> None:
        self._write("add_histogram_raw", tag, histogram.min, histogram.max, histogram.num, histogram.sum,
                    histogram.sum_squares, histogram.edges[1:].tolist(), histogram.counts.tolist(), step)

    def graph(self, model: torch.nn.Module, example: torch.Tensor) -> None:
        with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns of its deprecation
            warnings.simplefilter("ignore")
            self._open_writer().add_graph(model, example)

    def finish(self, hparams: dict[str, Any], final: dict[str, float]) -> None:
        """The hyper-parameters and final metrics, for TensorBoard's HPARAMS tab."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        writer = self._open_writer()
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        for summary in hparams_summary(clean, final):
            writer.file_writer.add_summary(summary)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _quiet_event_writer_threads() -> None:
    """A failed write (a full disk) ends TensorBoard's event-writer thread with a traceback on
    stderr, then comes back as the same OSError from the writer's next call, where
    :class:`GuardedSink` turns the sink off with one warning: keep only that warning."""
    previous = threading.excepthook
    if getattr(previous, "quiets_event_writers", False):
        return

    def hook(args: Any) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError)):
            previous(args)

    hook.quiets_event_writers = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class JsonlSink(Sink):
    """``metrics.jsonl``: one JSON object per epoch, appended whole (what ``trainer.report`` reads).

    The run's one history: a line that cannot be written stops the run (:class:`StorageError`)
    rather than leaving a gap, and a line cut by a full disk is taken back.
    """

    name = "jsonl"

    def __init__(self, path: Path) -> None:
        self.path = path

    def epoch(self, record: dict[str, Any], step: int) -> None:
        try:
            atomic.append(self.path, (json.dumps(record) + "\n").encode())
        except OSError as exc:
            raise StorageError(stopped_by_write(str(self.path), exc, self.path)) from None


def _turned_off(name: str, method: str, detail: str) -> None:
    log.warning("%s is off for the rest of this run: %s failed (%s); training goes on", name, method, detail[:300])


class ForwardingSink(Sink):
    """A wrapper that hands every call of the sink API to ``inner`` through :meth:`_forward`, which
    says how (guarded on the caller's thread, or queued to a thread of its own). Mutable arguments
    are copied: the caller may change them once the call returns."""

    def __init__(self, inner: Sink) -> None:
        self.inner, self.name = inner, inner.name
        self.failed = False

    def _forward(self, method: str, *args: Any) -> None:
        raise NotImplementedError

    def open(self, config: dict[str, Any], config_yaml: str, resume_id: str | None, step: int) -> None:
        self._forward("open", config, config_yaml, resume_id, step)

    def run_id(self) -> str | None:
        return self.inner.run_id()  # chosen before the run opens: no waiting

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._forward("scalars", dict(values), step)

    def epoch(self, record: dict[str, Any], step: int) -> None:
        self._forward("epoch", dict(record), step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        self._forward("image", tag, image, step)

    def table(self, tag: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self._forward("table", tag, columns, rows, step)

    def histogram(self, tag: str, histogram: Histogram, step: int) -> None:
        self._forward("histogram", tag, histogram, step)

    def graph(self, model: torch.nn.Module, example: torch.Tensor) -> None:
        self._forward("graph", model, example)

    def finish(self, hparams: dict[str, Any], final: dict[str, float]) -> None:
        self._forward("finish", dict(hparams), dict(final))


class GuardedSink(ForwardingSink):
    """Runs a local sink's calls on the caller's thread; the first failed write (an OSError: a
    full or read-only disk) turns it off with one warning naming the disk, as :class:`BackgroundSink`
    does for any error of the sinks it runs."""

    def __init__(self, inner: Sink, folder: Path) -> None:
        super().__init__(inner)
        self.folder = folder

    def _forward(self, method: str, *args: Any) -> None:
        if self.failed:
            return
        try:
            getattr(self.inner, method)(*args)
        except OSError as exc:
            self.failed = True
            _turned_off(self.name, method, disk_problem(exc, self.folder))

    def close(self) -> None:
        if self.failed:  # release its files; what it would still write has nowhere to go
            with suppress(OSError):
                self.inner.close()
        else:
            self._forward("close")


class BackgroundSink(ForwardingSink):
    """Runs another sink's calls, in order, on a thread of its own.

    The first exception turns the sink off with one warning; the calls still queued are dropped.
    """

    def __init__(self, inner: Sink) -> None:
        super().__init__(inner)
        self.calls: queue.SimpleQueue[tuple[str, tuple[Any, ...]] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name=f"sink-{inner.name}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while (call := self.calls.get()) is not None:
            method, args = call
            if self.failed and method != "close":
                continue
            try:
                getattr(self.inner, method)(*args)
            except Exception as exc:  # noqa: BLE001 - any tracker error must not end the run
                if not self.failed:
                    self.failed = True
                    _turned_off(self.name, method, " ".join(str(exc).split()) or type(exc).__name__)

    def _forward(self, method: str, *args: Any) -> None:
        if not self.failed:
            self.calls.put((method, args))

    def graph(self, model: torch.nn.Module, example: torch.Tensor) -> None:
        """Not forwarded: tracing on another thread would race the training that uses the model."""

    def close(self) -> None:
        self.calls.put(("close", ()))
        self.calls.put(None)
        self.thread.join(CLOSE_WAIT_S)
        if self.thread.is_alive():
            log.warning("%s did not finish writing within %.0f s; its last records may be missing",
                        self.name, CLOSE_WAIT_S)
