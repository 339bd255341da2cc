"""Where a run's metrics and pictures go: one small interface (:class:`Sink`) and its four
implementations (TensorBoard, JSON lines, wandb, MLflow), built on rank 0 only.

wandb and MLflow run behind :class:`BackgroundSink`: their calls queue to a thread of their own,
so a slow disk, a slow server or a hanging client never stalls a training step, and a failure
is one warning line, after which the run goes on with the other sinks.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

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


class JsonlSink(Sink):
    """``metrics.jsonl``: one JSON object per epoch, appended (what ``trainer.report`` reads)."""

    name = "jsonl"

    def __init__(self, path: Path) -> None:
        self.path = path

    def epoch(self, record: dict[str, Any], step: int) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


class TrackerUnavailable(RuntimeError):
    """A tracker that cannot start here (not installed, unreachable); the message says what to do."""


class WandbSink(Sink):
    """A Weights & Biases run; offline by default, its files under ``run_dir/wandb``.

    The run id is chosen here, so the first checkpoint already holds it; a resumed run passes
    it back with ``resume="allow"`` and continues the same run.
    """

    name = "wandb"

    def __init__(self, run_dir: Path, project: str, run_name: str, mode: str) -> None:
        self.run_dir, self.project, self.run_name, self.mode = run_dir, project, run_name, mode
        self.id = uuid.uuid4().hex[:12]
        self.run: Any = None

    def open(self, config: dict[str, Any], config_yaml: str, resume_id: str | None, step: int) -> None:
        if self.mode == "offline":
            os.environ["WANDB_ERROR_REPORTING"] = "false"  # nothing may try the network
        try:
            import wandb
        except ImportError as exc:
            raise TrackerUnavailable(f"cannot import wandb ({exc}); pip install 'torch-launchpad[wandb]'") from None
        self.wandb = wandb
        self.id = resume_id or self.id
        settings = wandb.Settings(console="off", silent=True, disable_git=True, save_code=False)
        self.run = wandb.init(project=self.project, name=self.run_name, id=self.id, resume="allow",
                              dir=str(self.run_dir), mode=self.mode, config=config, allow_val_change=True,
                              settings=settings)
        where = f"{self.run_dir / 'wandb'}/offline-run-*-{self.id}"
        log.info("wandb: run %s %s", self.id, f"offline in {where}; upload with: wandb sync {where}"
                 if self.mode == "offline" else f"at {self.run.url}")

    def run_id(self) -> str | None:
        return self.id

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def table(self, tag: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.run.log({tag: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def histogram(self, tag: str, histogram: Histogram, step: int) -> None:
        self.run.log({tag: self.wandb.Histogram(np_histogram=(histogram.counts, histogram.edges))}, step=step)

    def finish(self, hparams: dict[str, Any], final: dict[str, float]) -> None:
        self.run.summary.update(final)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class MlflowSink(Sink):
    """An MLflow run in a SQLite store in the run directory (``mlflow.db``), or at ``uri``.

    MLflow picks run ids itself, when the run is created; so that the first checkpoint holds an
    id without waiting for the store, the run carries a key of ours as the tag :data:`RESUME_TAG`,
    and a resumed run finds its MLflow run by that tag. It sets the run back to RUNNING and adds
    only parameters it does not have yet (MLflow refuses to change a logged parameter; the new
    ``config.yaml`` artifact shows the change). Running values are buffered and sent with each
    epoch's metrics in one request.
    """

    name = "mlflow"
    RESUME_TAG = "launchpad.resume_key"
    BATCH = 100  # MLflow's limit on parameters per request

    def __init__(self, run_dir: Path, uri: str, experiment: str, run_name: str) -> None:
        self.run_dir, self.experiment, self.run_name = run_dir, experiment, run_name
        self.uri = uri or f"sqlite:///{run_dir / 'mlflow.db'}"
        self.key = uuid.uuid4().hex
        self.id: str | None = None  # MLflow's run id, once open
        self.buffered: list[Any] = []
        self.finished = False

    def open(self, config: dict[str, Any], config_yaml: str, resume_id: str | None, step: int) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise TrackerUnavailable(f"cannot import mlflow ({exc}); pip install 'torch-launchpad[mlflow]'") from None
        for noisy in ("mlflow", "alembic"):  # database migrations log at INFO on every new store
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.client = client = MlflowClient(tracking_uri=self.uri)
        self.key = resume_id or self.key
        found = client.get_experiment_by_name(self.experiment)
        local = self.uri.startswith("sqlite:///")
        experiment_id = found.experiment_id if found else client.create_experiment(
            self.experiment, artifact_location=(self.run_dir / "mlflow-artifacts").as_uri() if local else None)
        earlier = client.search_runs([experiment_id], f"tags.`{self.RESUME_TAG}` = '{self.key}'", max_results=1)
        if earlier:
            run = earlier[0]
            client.update_run(run.info.run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=self.run_name, tags={self.RESUME_TAG: self.key})
        self.id = run.info.run_id
        params = [Param(key, str(value)[:6000]) for key, value in config.items() if key not in run.data.params]
        for start in range(0, len(params), self.BATCH):
            client.log_batch(self.id, params=params[start:start + self.BATCH])
        client.log_text(self.id, config_yaml, "config.yaml")
        log.info("mlflow: run %s in %s (mlflow ui --backend-store-uri %s)", self.id, self.uri, self.uri)

    def run_id(self) -> str | None:
        return self.key

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = _millis()
        self.buffered += [Metric(key, float(value), stamp, step) for key, value in values.items()]

    def epoch(self, record: dict[str, Any], step: int) -> None:
        super().epoch(record, step)
        self._send_buffered()

    def _send_buffered(self) -> None:
        for start in range(0, len(self.buffered), 1000):  # MLflow's limit on metrics per request
            self.client.log_batch(self.id, metrics=self.buffered[start:start + 1000])
        self.buffered.clear()

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        self.client.log_image(self.id, image, key=tag, step=step)

    def table(self, tag: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.client.log_dict(self.id, {"columns": columns, "rows": rows}, f"tables/{tag}/step_{step:09d}.json")

    def finish(self, hparams: dict[str, Any], final: dict[str, float]) -> None:
        self.client.set_terminated(self.id, "FINISHED")
        self.finished = True

    def close(self) -> None:
        if self.id is None:
            return
        self._send_buffered()
        if not self.finished:  # stopped or failed: a resume sets it RUNNING again
            self.client.set_terminated(self.id, "KILLED")


def _millis() -> int:
    import time

    return int(time.time() * 1000)


class BackgroundSink(Sink):
    """Runs another sink's calls, in order, on a thread of its own.

    The first exception turns the sink off with one warning; the calls still queued are dropped.
    """

    def __init__(self, inner: Sink) -> None:
        self.inner, self.name = inner, inner.name
        self.calls: queue.SimpleQueue[tuple[str, tuple[Any, ...]] | None] = queue.SimpleQueue()
        self.failed = False
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
                    detail = " ".join(str(exc).split()) or type(exc).__name__
                    log.warning("%s is off for the rest of this run: %s failed (%s); training goes on",
                                self.name, method, detail[:300])

    def _submit(self, method: str, *args: Any) -> None:
        if not self.failed:
            self.calls.put((method, args))

    def open(self, config: dict[str, Any], config_yaml: str, resume_id: str | None, step: int) -> None:
        self._submit("open", config, config_yaml, resume_id, step)

    def run_id(self) -> str | None:
        return self.inner.run_id()  # chosen before the thread opens the run: no waiting

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._submit("scalars", dict(values), step)

    def epoch(self, record: dict[str, Any], step: int) -> None:
        self._submit("epoch", dict(record), step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        self._submit("image", tag, image, step)

    def table(self, tag: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self._submit("table", tag, columns, rows, step)

    def histogram(self, tag: str, histogram: Histogram, step: int) -> None:
        self._submit("histogram", tag, histogram, step)

    def finish(self, hparams: dict[str, Any], final: dict[str, float]) -> None:
        self._submit("finish", dict(hparams), dict(final))

    def close(self) -> None:
        self.calls.put(("close", ()))
        self.calls.put(None)
        self.thread.join(CLOSE_WAIT_S)
        if self.thread.is_alive():
            log.warning("%s did not finish writing within %.0f s; its last records may be missing",
                        self.name, CLOSE_WAIT_S)


def build_sinks(names: list[str], run_dir: Path, project: str, wandb_mode: str, mlflow_uri: str) -> list[Sink]:
    """The sinks ``log.trackers`` names, in that order; wandb and MLflow behind a thread."""
    makers = {
        "tensorboard": lambda: TensorBoardSink(run_dir / "tensorboard"),
        "jsonl": lambda: JsonlSink(run_dir / "metrics.jsonl"),
        "wandb": lambda: BackgroundSink(WandbSink(run_dir, project, run_dir.name, wandb_mode)),
        "mlflow": lambda: BackgroundSink(MlflowSink(run_dir, mlflow_uri, project, run_dir.name)),
    }
    return [makers[name]() for name in names]
