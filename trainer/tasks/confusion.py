"""Scores from a confusion matrix: one reduced across ranks once per validation, and what it tells
per class (precision, recall, F1, support, the most frequent confusions)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

TOP_CONFUSIONS = 20
"""Rows of the top-confusions table."""


class ConfusionMeter:
    """Confusion matrix, top-5 hits and loss sum; yields accuracy and macro precision/recall/F1.

    Counts are int64 and the loss sum float32 on the device (MPS has no float64); they reach the
    host once, in :meth:`reduce`.
    """

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        self.top5 = torch.zeros((), dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.reduced_confusion: torch.Tensor | None = None  # set by reduce(): every rank's, on the CPU

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """One batch of fp32 logits and class-index targets."""
        preds = logits.argmax(dim=1)
        self.confusion += torch.bincount(targets * self.num_classes + preds, minlength=self.num_classes ** 2)
        k = min(5, logits.shape[1])
        self.top5 += (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum()
        self.loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").detach().float()

    def reduce(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """All metrics over every rank's samples (one all-reduce; every rank must call it).

        The counts and the loss sum go to the host first and are reduced there in float64, so
        ``group`` is best the CPU (gloo) control group.
        """
        packed = torch.cat([self.confusion.cpu().double(), torch.stack([self.loss_sum, self.top5]).cpu().double()])
        if dist.is_initialized():
            dist.all_reduce(packed, group=group)
        confusion = packed[: self.num_classes ** 2].view(self.num_classes, self.num_classes)
        self.reduced_confusion = confusion
        loss_sum, top5 = packed[-2:].tolist()
        return summarise(confusion, loss_sum, top5)

    def rows(self, classes: list[str]) -> list[dict[str, Any]]:
        """The per-class rows of the reduced confusion matrix (after :meth:`reduce`)."""
        return per_class_rows(self.reduced_confusion, classes) if self.reduced_confusion is not None else []


def summarise(confusion: torch.Tensor, loss_sum: float, top5: float) -> dict[str, float]:
    """Metrics from a confusion matrix (rows: true class, columns: predicted)."""
    count = confusion.sum().item()
    hits = confusion.diag()
    precision, recall, f1 = per_class(confusion)
    predicted, actual = confusion.sum(dim=0), confusion.sum(dim=1)
    present = (actual > 0) | (predicted > 0)  # every class seen as a target or a prediction
    n = max(int(present.sum()), 1)
    return {
        "loss": loss_sum / max(count, 1.0), "top1": hits.sum().item() / max(count, 1.0),
        "top5": top5 / max(count, 1.0), "precision": precision[present].sum().item() / n,
        "recall": recall[present].sum().item() / n, "f1": f1[present].sum().item() / n,
        "samples": int(count),
    }


def per_class(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Precision, recall and F1 of each class (0 where undefined) from a confusion matrix."""
    hits = confusion.diag()
    predicted, actual = confusion.sum(dim=0), confusion.sum(dim=1)
    precision = torch.where(predicted > 0, hits / predicted.clamp(min=1), torch.zeros_like(hits))
    recall = torch.where(actual > 0, hits / actual.clamp(min=1), torch.zeros_like(hits))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(hits))
    return precision, recall, f1


def per_class_rows(confusion: torch.Tensor, classes: list[str]) -> list[dict[str, Any]]:
    """One row per class: precision, recall, F1 and support (its true samples)."""
    confusion = confusion.double()
    precision, recall, f1 = per_class(confusion)
    support = confusion.sum(dim=1)
    return [{"class": name, "precision": p, "recall": r, "f1": f, "support": int(n)} for name, p, r, f, n in
            zip(classes, precision.tolist(), recall.tolist(), f1.tolist(), support.tolist())]



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
