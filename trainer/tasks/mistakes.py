"""The pictures of a classification validation: per-class table, confusion matrix, most frequent
confusions, and the worst mistakes.

The only per-batch work is a top-k of the misclassified samples per rank, on the device,
gathered to rank 0 once at the end.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trainer.observe.sinks import MetricSinks
from trainer.parallel.distributed import DistEnv
from trainer.tasks.confusion import ConfusionMeter, per_class_rows, top_confusions

WORST_MISTAKES = 16
"""Misclassified samples shown per validation."""


class ConfusionEvidence:
    """Keeps this rank's ``k`` highest-loss misclassified samples on the device; given the reduced
    meter, gathers them to rank 0 as uint8 pixels (a collective: every rank takes part)."""

    def __init__(self, env: DistEnv, to_pixels: Callable[[torch.Tensor], np.ndarray], classes: list[str],
                 k: int = WORST_MISTAKES) -> None:
        self.env, self.to_pixels, self.classes, self.k = env, to_pixels, classes, k
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

    def finish(self, meter: ConfusionMeter) -> None:
        self.confusion = meter.reduced_confusion
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

    def publish(self, sinks: MetricSinks, step: int) -> list[dict[str, Any]]:
        """Rank 0: the per-class table (returned, for per_class.json), the confusion matrix, the
        most frequent confusions and the worst mistakes."""
        from trainer.observe import pictures  # PIL's drawing modules: imported when first needed

        if self.confusion is None:
            return []
        rows = per_class_rows(self.confusion, self.classes)
        sinks.table("val/per_class", list(rows[0]), [list(row.values()) for row in rows], step)
        counts = self.confusion.double().numpy()
        sinks.image("val/confusion_matrix", pictures.confusion_image(counts, self.classes), step)
        sinks.table("val/top_confusions", ["true", "predicted", "count", "share of true class"],
                    top_confusions(counts, self.classes), step)
        if self.mistakes:
            pixels = np.stack([image for _, image, _, _ in self.mistakes])
            captions = [f"true: {self.classes[t]}\npred: {self.classes[p]}" for _, _, t, p in self.mistakes]
            sinks.image("val/worst_mistakes", pictures.image_grid(pixels, captions), step)
        return rows
