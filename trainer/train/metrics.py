"""Classification metrics accumulated on the device and reduced across ranks once, exactly."""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from trainer.data.stages import Normalize
from trainer.train.precision import Precision


class TrainMeter:
    """One epoch's training loss: no op and no host sync per step, no float64 on the device (MPS has none).

    Step losses (the 0-d tensors the step computed anyway) collect in a list. Every ``window``
    steps or so, :meth:`flush` reads them in one transfer and adds them to the epoch's sum, a
    float64 on the host, in order: the sum does not depend on where windows were cut (a resume
    cuts one).
    """

    def __init__(self, window: int) -> None:
        self.loss_sum = 0.0
        self.count = 0
        self.window = window
        self.losses: list[torch.Tensor] = []
        self.window_sizes: list[int] = []
        self.window_steps: list[int] = []
        self.pending_bad_step: int | None = None  # found by an automatic flush, reported by the next flush()

    def update(self, loss: torch.Tensor, batch_size: int, step: int) -> None:
        """Record one batch's mean loss (a 0-d tensor); flushes by itself when the window is full."""
        if len(self.losses) == self.window:
            self.pending_bad_step = self.flush()
        self.losses.append(loss.detach() if loss.requires_grad else loss)
        self.window_sizes.append(batch_size)
        self.window_steps.append(step)

    def flush(self) -> int | None:
        """Fold the window into the sum; return the step of the first non-finite loss, if any."""
        pending, self.pending_bad_step = self.pending_bad_step, None
        if not self.losses:
            return pending
        losses = torch.stack(self.losses).float().tolist()  # the window's one host transfer
        for loss, size in zip(losses, self.window_sizes):  # in float64, one by one: the same sum
            self.loss_sum += loss * size                    # however the epoch was cut into windows
        self.count += sum(self.window_sizes)
        steps = self.window_steps[:]
        self.losses.clear()
        self.window_sizes.clear()
        self.window_steps.clear()
        if pending is not None:
            return pending
        return next((step for step, loss in zip(steps, losses) if not math.isfinite(loss)), None)

    def mean_loss(self) -> float:
        """This rank's mean loss so far (flush first)."""
        return self.loss_sum / max(self.count, 1)

    def state(self) -> torch.Tensor:
        """Loss sum and count as a CPU tensor (flush first)."""
        return torch.tensor([self.loss_sum, float(self.count)], dtype=torch.float64)

    def load_state(self, state: torch.Tensor) -> None:
        self.loss_sum, self.count = float(state[0]), int(state[1])

    def reduce(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Mean loss and sample count over all ranks (flush first; a collective: every rank must call it).

        The sums are host values, so ``group`` is best the CPU (gloo) control group.
        """
        sums = torch.tensor([self.loss_sum, float(self.count)], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(sums, group=group)
        loss_sum, count = sums.tolist()
        return {"loss": loss_sum / max(count, 1.0), "samples": int(count)}


class EvalMeter:
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

    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss_sum: torch.Tensor) -> None:
        preds = logits.argmax(dim=1)
        self.confusion += torch.bincount(targets * self.num_classes + preds, minlength=self.num_classes ** 2)
        k = min(5, logits.shape[1])
        self.top5 += (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum()
        self.loss_sum += loss_sum.detach().float()

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


class EvalObserver(Protocol):
    """Sees each validation batch, then the reduced confusion matrix (see trainer.observe.visuals)."""

    def update(self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None: ...

    def finish(self, confusion: torch.Tensor) -> None: ...


@torch.inference_mode()
def evaluate_model(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
                   precision: Precision, memory_format: torch.memory_format = torch.contiguous_format,
                   group: dist.ProcessGroup | None = None, stop: Callable[[], bool] = lambda: False,
                   observer: EvalObserver | None = None, *, normalize: Normalize) -> tuple[dict[str, float], int]:
    """``model``'s metrics over ``loader`` (reduced over every rank) and the bad samples skipped here.

    ``stop()`` is checked before each batch: a rank told to stop leaves early, so the metrics are
    then partial (the caller discards them). It needs no agreement between ranks: the only
    collective is the reduction at the end, which every rank reaches either way.
    ``observer`` (on every rank or none) sees each batch (as loaded: uint8 from our transforms) and
    the reduced confusion matrix. ``normalize`` makes the model's input on the device.
    """
    model.eval()
    meter, skipped = EvalMeter(num_classes, device), 0
    for images, targets, bad in loader:
        if stop():
            break
        skipped += bad
        if not len(targets):  # every sample unreadable; the only collective is after the loop
            continue
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast(device):
            logits = model(normalize(images)).float()
        meter.update(logits, targets, nn.functional.cross_entropy(logits, targets, reduction="sum"))
        if observer is not None:
            observer.update(images, logits, targets)
    metrics = meter.reduce(group)
    if observer is not None:
        observer.finish(meter.reduced_confusion)  # type: ignore[arg-type]
    return metrics, skipped


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
