"""What a run shows besides numbers: sample grids, the confusion matrix, per-class metrics, the
worst validation mistakes, weight and gradient histograms, the model graph.

All of it happens once at the start or once per epoch, on rank 0, outside the training loop.
The only per-batch work is in validation (:class:`ValidationEvidence`): a top-k of the
misclassified samples per rank, on the device, gathered to rank 0 once at the end.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trainer.checkpoint import atomic
from trainer.config import Config
from trainer.data.stages import Normalize
from trainer.models import evaluation_mode
from trainer.observe.logs import MetricSinks
from trainer.observe.trackers import Histogram
from trainer.parallel.distributed import DistEnv
from trainer.train.metrics import per_class

GRID_IMAGES = 16
"""Training samples in the start grid, and worst mistakes per epoch."""
TOP_CONFUSIONS = 20
"""Rows of the top-confusions table."""


class ValidationEvidence:
    """An evaluation observer (see ``metrics.evaluate_model``): keeps this rank's ``k`` highest-loss
    misclassified samples on the device, then, given the reduced confusion matrix, gathers them
    to rank 0 as uint8 pixels (a collective: every rank takes part)."""

    def __init__(self, env: DistEnv, to_pixels: Callable[[torch.Tensor], np.ndarray], k: int = GRID_IMAGES) -> None:
        self.env, self.to_pixels, self.k = env, to_pixels, k
        self.kept: tuple[torch.Tensor, ...] | None = None  # losses, images, targets, predictions
        self.confusion: torch.Tensor | None = None
        self.mistakes: list[tuple[float, np.ndarray, int, int]] = []  # rank 0: the worst, worst first

    def update(self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        predictions = logits.argmax(dim=1)
        losses = nn.functional.cross_entropy(logits, targets, reduction="none")
        losses = losses.masked_fill(predictions == targets, float("-inf"))  # right answers never rank
        worst, index = losses.topk(min(self.k, losses.numel()))
        batch = (worst, images[index], targets[index], predictions[index])
        if self.kept is not None:
            merged = [torch.cat([old, new]) for old, new in zip(self.kept, batch)]
            _, index = merged[0].topk(min(self.k, merged[0].numel()))
            batch = tuple(part[index] for part in merged)
        self.kept = batch

    def finish(self, confusion: torch.Tensor) -> None:
        self.confusion = confusion
        mine: list[tuple[float, np.ndarray, int, int]] = []
        if self.kept is not None:
            losses, images, targets, predictions = (part.cpu() for part in self.kept)
            mine = [(loss, pixels, target, prediction) for loss, pixels, target, prediction
                    in zip(losses.tolist(), self.to_pixels(images), targets.tolist(), predictions.tolist())
                    if loss != float("-inf")]
        everyone = [mine]
        if self.env.is_distributed:
            everyone = [None] * self.env.world_size if self.env.is_main else None  # type: ignore[list-item]
            dist.gather_object(mine, everyone, dst=0, group=self.env.control)
        if self.env.is_main:
            pooled = [item for items in everyone for item in items]  # type: ignore[union-attr]
            self.mistakes = sorted(pooled, key=lambda item: -item[0])[:self.k]


class RunVisuals:
    """Makes and sends the pictures and tables (rank 0); a no-op elsewhere and with
    ``log.pictures=false`` (histograms and the graph have their own keys)."""

    def __init__(self, cfg: Config, env: DistEnv, run_dir: Path, classes: list[str], normalize: Normalize) -> None:
        self.log_cfg, self.env, self.classes, self.normalize = cfg.log, env, classes, normalize
        self.per_class_path = run_dir / "per_class.json"
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None  # training samples for gradient histograms

    def evidence(self) -> ValidationEvidence | None:
        """An observer for the next evaluation, when pictures are on (same answer on every rank)."""
        return ValidationEvidence(self.env, self.normalize.to_pixels) if self.log_cfg.pictures else None

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
        keys = itertools.chain.from_iterable(iter(sampler))  # the batch sampler's (epoch, index) keys
        samples = [train_set[key] for key in itertools.islice(keys, GRID_IMAGES)]
        samples = [sample for sample in samples if sample is not None]
        if not samples:
            return
        images = torch.stack([image for image, _ in samples])
        targets = torch.tensor([target for _, target in samples])
        self.probe = (images, targets)
        if step > 0:
            return
        if cfg.pictures:
            from trainer.observe import pictures  # PIL's drawing modules: imported when first needed

            captions = [self.classes[t] for t in targets.tolist()]
            sinks.image("train/augmented_samples", pictures.image_grid(self.normalize.to_pixels(images), captions), 0)
        if cfg.graph:
            with evaluation_mode(model):
                sinks.graph(model, self.normalize(images[:1].to(device)))

    def at_epoch_end(self, sinks: MetricSinks, evidence: ValidationEvidence | None, model: nn.Module,
                     epoch: int, step: int) -> None:
        """Per-class table (and ``per_class.json``), confusion matrix, worst mistakes, histograms."""
        if not self.env.is_main:
            return
        if evidence is not None and evidence.confusion is not None:
            self._validation_pictures(sinks, evidence, epoch, step)
        every = self.log_cfg.histogram_every_epochs
        if every > 0 and epoch % every == 0:
            self._histograms(sinks, model, step)

    def _validation_pictures(self, sinks: MetricSinks, evidence: ValidationEvidence, epoch: int,
                             step: int) -> None:
        from trainer.observe import pictures

        confusion = evidence.confusion.double()  # type: ignore[union-attr]
        precision, recall, f1 = per_class(confusion)
        support = confusion.sum(dim=1)
        columns = ["class", "precision", "recall", "f1", "support"]
        rows = [[name, p, r, f, int(n)] for name, p, r, f, n in
                zip(self.classes, precision.tolist(), recall.tolist(), f1.tolist(), support.tolist())]
        sinks.table("val/per_class", columns, rows, step)
        _write_json_atomic(self.per_class_path, {"epoch": epoch, "step": step,
                                                 "classes": [dict(zip(columns, row)) for row in rows]})
        counts = confusion.numpy()
        sinks.image("val/confusion_matrix", pictures.confusion_image(counts, self.classes), step)
        sinks.table("val/top_confusions", ["true", "predicted", "count", "share of true class"],
                    top_confusions(counts, self.classes), step)
        if evidence.mistakes:
            pixels = np.stack([image for _, image, _, _ in evidence.mistakes])
            captions = [f"true: {self.classes[t]}\npred: {self.classes[p]}" for _, _, t, p in evidence.mistakes]
            sinks.image("val/worst_mistakes", pictures.image_grid(pixels, captions), step)

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
            loss = nn.functional.cross_entropy(model(self.normalize(images)).float(), targets)
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        for (name, _), grad in zip(named, grads):
            if grad is not None and (histogram := Histogram.of(grad)) is not None:
                sinks.histogram(f"grads/{name}", histogram, step)


def top_confusions(confusion: np.ndarray, classes: Sequence[str], count: int = TOP_CONFUSIONS) -> list[list[Any]]:
    """The most frequent (true, predicted) pairs off the diagonal: the errors worth a look first."""
    off = confusion.astype(np.float64).copy()
    np.fill_diagonal(off, 0)
    totals = confusion.sum(axis=1)
    order = np.argsort(off, axis=None)[::-1][:count]
    rows = []
    for flat in order:
        true, predicted = divmod(int(flat), len(classes))
        if off[true, predicted] <= 0:
            break
        rows.append([classes[true], classes[predicted], int(off[true, predicted]),
                     float(off[true, predicted] / totals[true])])
    return rows


def _write_json_atomic(path: Path, value: Any) -> None:
    """Replace ``path`` as a whole: a reader never sees half a file."""
    with atomic.replacing(path) as file:
        file.write((json.dumps(value, indent=1) + "\n").encode())
