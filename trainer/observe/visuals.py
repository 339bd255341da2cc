"""What a run shows besides numbers: the grid of augmented samples, the task's validation pictures
and per-class table (``per_class.json``), weight and gradient histograms, the model graph.

All of it happens once at the start or once per epoch, on rank 0, outside the training loop.
What a validation shows is the task's (see trainer.tasks.base.Evidence).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from trainer.checkpoint import atomic
from trainer.config import Config
from trainer.data.stages import Normalize
from trainer.errors import disk_problem
from trainer.models import evaluation_mode
from trainer.observe.console import log
from trainer.observe.sinks import MetricSinks
from trainer.observe.trackers import Histogram
from trainer.parallel.distributed import DistEnv

GRID_IMAGES = 16
"""Training samples in the start grid."""


class Evidence(Protocol):
    """Sees each validation batch on every rank, then, after the meter's reduction, gathers what
    the pictures need to rank 0 (a collective) and sends the pictures and tables there."""

    def update(self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None: ...

    def finish(self, meter: Any) -> None: ...

    def publish(self, sinks: MetricSinks, step: int) -> list[dict[str, Any]]:
        """Send the pictures (rank 0); return the per-class rows for ``per_class.json``."""
        ...


class Pictured(Protocol):
    """What the pictures need of the task (see trainer.tasks.base.Task)."""

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def caption(self, target: torch.Tensor, classes: list[str]) -> str: ...

    def evidence(self, env: DistEnv, to_pixels: Callable[[torch.Tensor], np.ndarray],
                 classes: list[str]) -> Evidence | None: ...


class RunVisuals:
    """Makes and sends the pictures and tables (rank 0); a no-op elsewhere and with
    ``log.pictures=false`` (histograms and the graph have their own keys)."""

    def __init__(self, cfg: Config, env: DistEnv, run_dir: Path, classes: list[str], normalize: Normalize,
                 task: Pictured) -> None:
        self.log_cfg, self.env, self.classes, self.normalize, self.task = cfg.log, env, classes, normalize, task
        self.per_class_path: Path | None = run_dir / "per_class.json"
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None  # training samples for gradient histograms

    def evidence(self) -> Evidence | None:
        """The task's observer for the next evaluation, when pictures are on (same answer on every rank)."""
        return self.task.evidence(self.env, self.normalize.to_pixels, self.classes) if self.log_cfg.pictures else None

    def at_start(self, sinks: MetricSinks, model: nn.Module, train_set: Any, sampler: Any,
                 device: torch.device, step: int) -> None:
        """The grid of augmented training samples and the model graph, for a run that starts afresh,
        made just before the sinks' first write (not before the first training step).

        The samples are this rank's first of the epoch's order, through the training transform
        (its randomness is seeded per sample, so this changes no random state the run uses).
        """
        cfg = self.log_cfg
        if self.env.is_main and (cfg.pictures or cfg.graph or cfg.histogram_every_epochs > 0):
            sinks.defer(lambda: self._start_pictures(sinks, model, train_set, sampler, device, step))

    def _start_pictures(self, sinks: MetricSinks, model: nn.Module, train_set: Any, sampler: Any,
                        device: torch.device, step: int) -> None:
        cfg = self.log_cfg
        keys = itertools.chain.from_iterable(iter(sampler))  # the batch sampler's sample keys
        samples = [train_set[key] for key in itertools.islice(keys, GRID_IMAGES)]
        samples = [sample for sample in samples if sample is not None]
        if not samples:
            return
        images = torch.stack([image for image, *_ in samples])
        targets = torch.stack([torch.as_tensor(target) for _, target, *_ in samples])
        self.probe = (images, targets)
        if step > 0:
            return
        if cfg.pictures:
            from trainer.observe import pictures  # PIL's drawing modules: imported when first needed

            captions = [self.task.caption(target, self.classes) for target in targets]
            sinks.image("train/augmented_samples", pictures.image_grid(self.normalize.to_pixels(images), captions), 0)
        if cfg.graph:
            with evaluation_mode(model):
                sinks.graph(model, self.normalize(images[:1].to(device)))

    def at_epoch_end(self, sinks: MetricSinks, evidence: Evidence | None, model: nn.Module,
                     epoch: int, step: int) -> None:
        """The task's validation pictures and per-class table (also ``per_class.json``), histograms."""
        if not self.env.is_main:
            return
        if evidence is not None and (rows := evidence.publish(sinks, step)) and self.per_class_path is not None:
            self._write_per_class({"epoch": epoch, "step": step, "classes": rows})
        every = self.log_cfg.histogram_every_epochs
        if every > 0 and epoch % every == 0:
            self._histograms(sinks, model, step)

    def _write_per_class(self, table: dict[str, Any]) -> None:
        """``per_class.json``, replaced whole; a failed write (a full disk) turns it off with one
        warning naming the disk, and training goes on."""
        path = self.per_class_path
        try:
            _write_json_atomic(path, table)
        except OSError as exc:
            self.per_class_path = None
            log.warning("%s is off for the rest of this run: writing it failed (%s); training goes on",
                        path.name, disk_problem(exc, path))

    def _histograms(self, sinks: MetricSinks, model: nn.Module, step: int) -> None:
        """Weights, and the gradients of the loss on the start grid's samples at these weights.

        The gradients are computed apart (``autograd.grad``: nothing accumulates into ``.grad``
        and no DDP hook fires), in eval mode (batch-norm statistics untouched), on this rank only.
        """
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        for name, parameter in named:
            if (weights := Histogram.of(parameter)) is not None:
                sinks.histogram(f"weights/{name}", weights, step)
        if self.probe is None:
            return
        device = named[0][1].device
        images, targets = (t.to(device) for t in self.probe)
        with evaluation_mode(model), torch.enable_grad():
            loss = self.task.loss(model(self.normalize(images)).float(), targets)
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        for (name, _), grad in zip(named, grads):
            if grad is not None and (histogram := Histogram.of(grad)) is not None:
                sinks.histogram(f"grads/{name}", histogram, step)


def _write_json_atomic(path: Path, value: Any) -> None:
    """Replace ``path`` as a whole: a reader never sees half a file."""
    with atomic.replacing(path) as file:
        file.write((json.dumps(value, indent=1) + "\n").encode())
