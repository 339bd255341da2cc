"""The rank-0 metric sinks (``log.trackers``), fanned out; the sinks themselves are in trainer.observe.trackers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from trainer.config import LogConfig
from trainer.errors import ConfigError
from trainer.config import user_code
from trainer.observe.hosted import MlflowSink, WandbSink
from trainer.observe.trackers import BackgroundSink, GuardedSink, Histogram, JsonlSink, Sink, TensorBoardSink
from trainer.parallel.distributed import DistEnv

if TYPE_CHECKING:
    from PIL import Image


class MetricSinks:
    """Rank 0's sinks (``log.trackers``: TensorBoard, metrics.jsonl, wandb, MLflow), fanned out.

    Every method is a no-op on other ranks. :meth:`state_dict` holds the trackers' run ids, which
    the checkpoint keeps so that a resumed or requeued run continues the same tracker runs.
    """

    def __init__(self, env: DistEnv, run_dir: Path, cfg: LogConfig) -> None:
        names = cfg.trackers if env.is_main else []
        self.sinks: list[Sink] = build_sinks(names, run_dir, cfg)
        self.tensorboard_dir = run_dir / "tensorboard" if "tensorboard" in names else None
        self.jsonl_path = run_dir / "metrics.jsonl" if "jsonl" in names else None
        self.resume_ids: dict[str, str] = {}
        self.started = False
        self.deferred: list[Callable[[], None]] = []

    def where(self) -> str:
        """Where the local sinks write, for the last lines of a run (wandb and MLflow say so at start)."""
        parts = [f"TensorBoard: tensorboard --logdir {self.tensorboard_dir}"] if self.tensorboard_dir else []
        parts += [f"metrics: {self.jsonl_path}"] if self.jsonl_path else []
        return f" ({', '.join(parts)})" if parts else ""

    def state_dict(self) -> dict[str, str]:
        """Each tracker's run id, known from the start (also those kept from the checkpoint for a
        tracker that is off this time). A kept id wins: a sink adopts it only when its thread
        opens the run, which may come after a checkpoint of a resumed run's first steps."""
        if not self.started:
            return dict(self.resume_ids)
        ids = {sink.name: run_id for sink in self.sinks if (run_id := sink.run_id()) is not None}
        return {**ids, **self.resume_ids}

    def load_state_dict(self, ids: dict[str, str]) -> None:
        """The run ids to continue; call before :meth:`start`."""
        self.resume_ids = dict(ids)

    def start(self, config: dict[str, Any], config_yaml: str, step: int) -> None:
        """Open every sink with the flattened config, from global step ``step`` (wandb and MLflow
        start on their own threads)."""
        for sink in self.sinks:
            sink.open(config, config_yaml, self.resume_ids.get(sink.name), step)
        self.started = True

    def defer(self, action: Callable[[], None]) -> None:
        """Run ``action`` just before the first scalars or epoch record: work for the sinks that
        should not delay the first training step (as the TensorBoard writer opens only then)."""
        self.deferred.append(action)

    def _run_deferred(self) -> None:
        while self.deferred:
            self.deferred.pop(0)()

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._run_deferred()
        for sink in self.sinks:
            sink.scalars(values, step)

    def epoch(self, record: dict[str, Any], step: int) -> None:
        """One epoch's reduced metrics, to every sink (metrics.jsonl gets one line)."""
        self._run_deferred()
        for sink in self.sinks:
            sink.epoch(record, step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        for sink in self.sinks:
            sink.image(tag, image, step)

    def table(self, tag: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        for sink in self.sinks:
            sink.table(tag, columns, rows, step)

    def histogram(self, tag: str, histogram: Histogram, step: int) -> None:
        for sink in self.sinks:
            sink.histogram(tag, histogram, step)

    def graph(self, model: nn.Module, example: torch.Tensor) -> None:
        for sink in self.sinks:
            sink.graph(model, example)

    def finish(self, hparams: dict[str, Any], final: dict[str, float]) -> None:
        """The run completed: hyper-parameters and final metrics (TensorBoard's HPARAMS, summaries)."""
        for sink in self.sinks:
            sink.finish(hparams, final)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_sinks(names: list[str], run_dir: Path, cfg: LogConfig) -> list[Sink]:
    """The sinks ``log.trackers`` names, in that order; wandb, MLflow and the user's own
    (``my_pkg.sinks:build``, called with the run directory and the log config) behind a thread."""
    makers = {
        "tensorboard": lambda: GuardedSink(TensorBoardSink(run_dir / "tensorboard"), run_dir / "tensorboard"),
        "jsonl": lambda: JsonlSink(run_dir / "metrics.jsonl"),
        "wandb": lambda: BackgroundSink(WandbSink(run_dir, cfg.project, run_dir.name, cfg.wandb_mode)),
        "mlflow": lambda: BackgroundSink(MlflowSink(run_dir, cfg.mlflow_uri, cfg.project, run_dir.name)),
    }
    return [makers[name]() if name in makers else _user_sink(name, run_dir, cfg) for name in names]


def _user_sink(spec: str, run_dir: Path, cfg: LogConfig) -> Sink:
    sink = user_code.load_callable(spec, "log.trackers")(run_dir, cfg)
    if not isinstance(sink, Sink):
        raise ConfigError(f"log.trackers: {spec} returned a {type(sink).__name__}; return a subclass of "
                          "trainer.observe.trackers.Sink")
    return BackgroundSink(sink)
