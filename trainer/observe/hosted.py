"""The hosted experiment trackers, wandb and MLflow, as sinks that work offline by default and
continue the same tracker run after a resume or requeue."""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


from trainer.checkpoint import atomic
from trainer.observe.trackers import Histogram, Sink

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("trainer")

class TrackerUnavailable(RuntimeError):
    """A tracker that cannot start here (not installed, unreachable); the message says what to do."""


@dataclass
class StepAxis:
    """wandb's step for the trainer's global step: strictly increasing over every process start
    of one wandb run, since wandb drops a row whose step does not increase.

    A resume from a checkpoint older than the last row logged (a killed run logged steps past its
    checkpoint) re-trains those steps; they are logged at ``global step + offset``, after the
    rows of the abandoned ones. The highest step handed to wandb is written to ``path`` before the
    row (a killed process cannot have logged past it), with the offset and the attempt number.
    """

    run_id: str
    attempt: int = 1  # process starts of this wandb run, this one included
    offset: int = 0  # wandb step minus global step
    last: int = -1  # the highest wandb step logged so far, by any attempt

    @classmethod
    def resume(cls, path: Path, run_id: str, step: int, server_step: int = 0) -> StepAxis:
        """The axis of the attempt that starts at global step ``step``, after what ``path`` (and
        the server, online: ``server_step`` is its next step) says earlier attempts logged."""
        try:
            earlier = cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            earlier = cls(run_id, attempt=0)
        if earlier.run_id != run_id:  # a new wandb run in the same folder
            earlier = cls(run_id, attempt=0)
        last = max(earlier.last, server_step - 1)
        return cls(run_id, earlier.attempt + 1, max(earlier.offset, last - step), last)

    def to(self, step: int) -> int:
        return step + self.offset

    def save(self, path: Path) -> None:
        with atomic.replacing(path) as file:
            file.write(json.dumps(asdict(self)).encode())


class WandbSink(Sink):
    """A Weights & Biases run; offline by default, its files under ``run_dir/wandb``.

    The run id is chosen here, so the first checkpoint already holds it; a resumed run passes
    it back with ``resume="allow"`` and continues the same run. Every row carries the trainer's
    ``trainer/global_step``; wandb's own step follows a :class:`StepAxis`, and each restart puts
    a marker (``trainer/resumed_from_step``, ``trainer/attempt``) in the row of the first step it
    trains, after every row of the earlier attempts.
    """

    name = "wandb"
    AXIS_FILE = "launchpad-steps.json"

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
        self.axis_path = self.run_dir / "wandb" / self.AXIS_FILE
        server_step = self.run.step if self.mode == "online" else 0  # offline, each start begins at 0
        self.axis = StepAxis.resume(self.axis_path, self.id, step, server_step)
        if self.axis.attempt > 1:
            self._log({"trainer/resumed_from_step": step, "trainer/attempt": self.axis.attempt}, step + 1,
                      global_step=False)
        where = f"{self.run_dir / 'wandb'}/offline-run-*-{self.id}"
        log.info("wandb: run %s %s", self.id, f"offline in {where}; upload with: wandb sync {where}"
                 if self.mode == "offline" else f"at {self.run.url}")

    def _log(self, values: dict[str, Any], step: int, global_step: bool = True) -> None:
        """One row at global step ``step``, on the wandb step its :class:`StepAxis` gives."""
        at = self.axis.to(step)
        if at > self.axis.last:
            self.axis.last = at
            self.axis.save(self.axis_path)
        self.run.log({**values, "trainer/global_step": step} if global_step else values, step=at)

    def run_id(self) -> str | None:
        return self.id

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._log(values, step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        self._log({tag: self.wandb.Image(image)}, step)

    def table(self, tag: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self._log({tag: self.wandb.Table(columns=columns, data=rows)}, step)

    def histogram(self, tag: str, histogram: Histogram, step: int) -> None:
        self._log({tag: self.wandb.Histogram(np_histogram=(histogram.counts, histogram.edges))}, step)

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

    MLflow keeps every value logged at a step, so a resume from a checkpoint older than the last
    step logged leaves two values at each re-trained step. Each process start is an attempt: the
    tag :data:`ATTEMPT_TAG` holds the latest number, a restart logs ``trainer/resumed_from_step``
    at its checkpoint's step and tags ``launchpad.attempt.<n>`` with that step, and every batch of
    values carries ``trainer/attempt`` with the same step and timestamp: that is the attempt a
    value belongs to.
    """

    name = "mlflow"
    RESUME_TAG = "launchpad.resume_key"
    ATTEMPT_TAG = "launchpad.attempt"
    BATCH = 100  # MLflow's limit on parameters per request

    def __init__(self, run_dir: Path, uri: str, experiment: str, run_name: str) -> None:
        self.run_dir, self.experiment, self.run_name = run_dir, experiment, run_name
        self.uri = uri or f"sqlite:///{run_dir / 'mlflow.db'}"
        self.key = uuid.uuid4().hex
        self.id: str | None = None  # MLflow's run id, once open
        self.buffered: list[Any] = []
        self.finished = False
        self.attempt = 1  # process starts of this MLflow run, this one included; known once open

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
        self.attempt = int(run.data.tags.get(self.ATTEMPT_TAG, "0")) + 1
        client.set_tag(self.id, self.ATTEMPT_TAG, str(self.attempt))
        if self.attempt > 1:
            client.set_tag(self.id, f"{self.ATTEMPT_TAG}.{self.attempt}", f"resumed from step {step}")
            self.scalars({"trainer/resumed_from_step": step}, step)
            self._send_buffered()
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
        self.buffered.append(Metric("trainer/attempt", float(self.attempt), stamp, step))

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
