"""Single-label classification: cross-entropy (or, as timm's recipes train, binary cross-entropy per
class) on class indices or class probabilities (from mixup or cutmix), a confusion matrix reduced
once across ranks, and the confusion pictures.

Validation scores with plain cross-entropy whichever the training loss (as timm does), so
``val/loss`` compares across losses and smoothing."""

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
    """One class per image: ``targets`` are class indices (int64) or class probabilities (float).

    ``loss``: ``ce`` (cross-entropy) or ``bce`` (binary cross-entropy of each class against its
    target probability; with ``bce_target_threshold`` > 0 a target above it counts as 1 and the
    rest as 0, timm's ``--bce-target-thresh``). ``label_smoothing`` applies to both.
    """

    name = "classification"
    target_form = "index"
    metrics = TASK_METRICS["classification"]

    def __init__(self, label_smoothing: float = 0.0, loss: str = "ce", bce_target_threshold: float = 0.0) -> None:
        self.label_smoothing, self.loss_name, self.bce_target_threshold = label_smoothing, loss, bce_target_threshold

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "ce":  # smooths class probabilities as it does indices: (1 - e) p + e / classes
            return nn.functional.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        classes = logits.shape[1]
        if not targets.is_floating_point():
            targets = nn.functional.one_hot(targets, classes).to(logits.dtype)
        if self.label_smoothing > 0:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / classes
        return binary_cross_entropy(logits, targets, self.bce_target_threshold)

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


def binary_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, target_threshold: float = 0.0) -> torch.Tensor:
    """Mean binary cross-entropy of each (sample, class) against a target probability; with
    ``target_threshold`` > 0 the targets above it become 1 and the rest 0 (0: as they are)."""
    if target_threshold > 0:
        targets = targets.gt(target_threshold).to(logits.dtype)
    return nn.functional.binary_cross_entropy_with_logits(logits, targets)
