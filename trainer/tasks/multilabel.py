"""Multi-label classification: any number of labels per image, multi-hot float targets, binary
cross-entropy per label, and per-label average precision (mAP) and F1 at a threshold.

AP needs every score at once: each rank keeps its validation scores on the device, and the
reduction gathers all of them to every rank. AP does not depend on the order of samples (tied
scores count as one threshold), so the metrics are the same at any world size.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trainer.config import TASK_METRICS
from trainer.observe.sinks import MetricSinks
from trainer.parallel.distributed import DistEnv
from trainer.tasks.classification import binary_cross_entropy
from trainer.tasks.ranking import average_precision, f1_at


class MultiLabel:
    """Several labels per image: ``targets`` are (N, classes) floats in [0, 1] (multi-hot, or soft
    after mixup or cutmix; ``bce_target_threshold`` > 0 makes them 0 or 1 again)."""

    name = "multilabel"
    target_form = "multi_hot"
    metrics = TASK_METRICS["multilabel"]

    def __init__(self, threshold: float = 0.5, bce_target_threshold: float = 0.0) -> None:
        self.threshold, self.bce_target_threshold = threshold, bce_target_threshold

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return binary_cross_entropy(logits, targets, self.bce_target_threshold)

    def meter(self, num_classes: int, device: torch.device) -> ScoreMeter:
        return ScoreMeter(num_classes, device, self.threshold)

    def stand_in_targets(self, count: int, num_classes: int) -> torch.Tensor:
        return torch.zeros(count, num_classes)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid()

    def caption(self, target: torch.Tensor, classes: list[str]) -> str:
        return ", ".join(classes[i] for i in target.nonzero().flatten().tolist()) or "(none)"

    def summary(self, metrics: dict[str, float]) -> str:
        return (f"val loss {metrics['loss']:.4f} mAP {metrics['map']:.4f} f1 {metrics['f1']:.4f} "
                f"(at {self.threshold:g})")

    def evidence(self, env: DistEnv, to_pixels: Callable[[torch.Tensor], np.ndarray],
                 classes: list[str]) -> LabelTable:
        return LabelTable(classes)


class ScoreMeter:
    """Every validation score and target of this rank, on the device, and the loss sum."""

    def __init__(self, num_classes: int, device: torch.device, threshold: float) -> None:
        self.num_classes, self.threshold = num_classes, threshold
        self.scores: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.per_class: dict[str, torch.Tensor] = {}  # set by reduce(): AP, F1, support per label

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """One batch of fp32 logits and multi-hot targets."""
        self.scores.append(logits.sigmoid())
        self.targets.append(targets.to(torch.uint8))
        losses = nn.functional.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none")
        self.loss_sum += losses.mean(dim=1).sum()

    def reduce(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """mAP, the loss, and micro precision/recall/F1 and macro F1 at the threshold, over every
        rank's samples (one all-gather; every rank must call it)."""
        mine = (self._stacked(self.scores, torch.float32), self._stacked(self.targets, torch.uint8),
                float(self.loss_sum))
        everyone = [mine]
        if dist.is_initialized():
            everyone = [None] * dist.get_world_size(group)  # type: ignore[list-item]
            dist.all_gather_object(everyone, mine, group=group)
        scores = torch.cat([s for s, _, _ in everyone]).double()
        targets = torch.cat([t for _, t, _ in everyone])
        count = scores.shape[0]
        ap = average_precision(scores, targets)  # NaN for a label without a positive sample
        predicted = scores >= self.threshold
        tp = (predicted & targets.bool()).sum(0).double()
        self.per_class = {"ap": ap, "precision": tp / predicted.sum(0).clamp(min=1),
                          "recall": tp / targets.sum(0).clamp(min=1), "support": targets.sum(0)}
        present = ~ap.isnan()
        metrics = {"map": ap[present].mean().item() if present.any() else 0.0,
                   "loss": sum(loss for _, _, loss in everyone) / max(count, 1), "samples": count}
        return {**metrics, **f1_at(scores, targets, self.threshold)}

    def _stacked(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat(parts).cpu() if parts else torch.zeros(0, self.num_classes, dtype=dtype)

    def rows(self, classes: list[str]) -> list[dict[str, Any]]:
        """One row per label: AP (None without a positive sample), precision, recall, support."""
        values = {key: tensor.tolist() for key, tensor in self.per_class.items()}
        return [{"class": name, "ap": None if math.isnan(values["ap"][i]) else values["ap"][i],
                 "precision": values["precision"][i], "recall": values["recall"][i],
                 "support": int(values["support"][i])} for i, name in enumerate(classes)]


class LabelTable:
    """What a multi-label validation shows: the per-label table (no per-batch work)."""

    def __init__(self, classes: list[str]) -> None:
        self.classes = classes
        self.rows: list[dict[str, Any]] = []

    def update(self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        pass

    def finish(self, meter: ScoreMeter) -> None:
        self.rows = meter.rows(self.classes)

    def publish(self, sinks: MetricSinks, step: int) -> list[dict[str, Any]]:
        if self.rows:
            sinks.table("val/per_class", list(self.rows[0]), [list(row.values()) for row in self.rows], step)
        return self.rows
