"""Single-label classification: cross-entropy on class indices (or soft vectors, e.g. from mixup),
a confusion matrix reduced once across ranks, and the confusion pictures."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from trainer.config import TASK_METRICS
from trainer.parallel.distributed import DistEnv
from trainer.tasks.confusion import ConfusionMeter
from trainer.tasks.mistakes import ConfusionEvidence


class Classification:
    """One class per image: ``targets`` are class indices (int64) or class probabilities (float)."""

    name = "classification"
    target_form = "index"
    metrics = TASK_METRICS["classification"]

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def meter(self, num_classes: int, device: torch.device) -> ConfusionMeter:
        return ConfusionMeter(num_classes, device)

    def stand_in_targets(self, count: int, num_classes: int) -> torch.Tensor:
        return torch.zeros(count, dtype=torch.long)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(dim=-1)

    def caption(self, target: torch.Tensor, classes: list[str]) -> str:
        return classes[int(target.argmax()) if target.is_floating_point() else int(target)]

    def summary(self, metrics: dict[str, float]) -> str:
        return (f"val loss {metrics['loss']:.4f} top1 {metrics['top1']:.4f} top5 {metrics['top5']:.4f} "
                f"f1 {metrics['f1']:.4f}")

    def evidence(self, env: DistEnv, to_pixels: Callable[[torch.Tensor], np.ndarray],
                 classes: list[str]) -> ConfusionEvidence:
        return ConfusionEvidence(env, to_pixels, classes)
