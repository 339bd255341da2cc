"""Classification metrics accumulated on the device and reduced across ranks once, exactly."""

from __future__ import annotations

import torch
import torch.distributed as dist


class TrainMeter:
    """Running sums of loss, top-1 hits and sample count for one epoch, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count

    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor) -> None:
        n = targets.numel()
        correct = (logits.argmax(dim=1) == targets).sum()
        self.sums += torch.stack([loss.detach().double() * n, correct.double(),
                                  torch.tensor(n, dtype=torch.float64, device=self.sums.device)])

    def mean_loss(self) -> float:
        """This rank's mean loss so far (reads the device: call it only every N steps)."""
        loss_sum, _, count = self.sums.tolist()
        return loss_sum / max(count, 1.0)

    def reduce(self) -> dict[str, float]:
        """Loss and top-1 over all ranks (a collective: every rank must call it)."""
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        loss_sum, correct, count = sums.tolist()
        return {"loss": loss_sum / max(count, 1.0), "top1": correct / max(count, 1.0), "samples": int(count)}


class EvalMeter:
    """Confusion matrix, top-5 hits and loss sum; yields accuracy and macro precision/recall/F1."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
        self.extra = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, top-5 hits

    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss_sum: torch.Tensor) -> None:
        preds = logits.argmax(dim=1)
        self.confusion += torch.bincount(targets * self.num_classes + preds,
                                         minlength=self.num_classes ** 2).double()
        k = min(5, logits.shape[1])
        top5 = (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum()
        self.extra += torch.stack([loss_sum.detach().double(), top5.double()])

    def reduce(self) -> dict[str, float]:
        """All metrics over every rank's samples (one all-reduce; every rank must call it)."""
        packed = torch.cat([self.confusion, self.extra])
        if dist.is_initialized():
            dist.all_reduce(packed)
        packed = packed.cpu()
        confusion = packed[: self.num_classes ** 2].view(self.num_classes, self.num_classes)
        loss_sum, top5 = packed[-2:].tolist()
        return summarise(confusion, loss_sum, top5)


def summarise(confusion: torch.Tensor, loss_sum: float, top5: float) -> dict[str, float]:
    """Metrics from a confusion matrix (rows: true class, columns: predicted)."""
    count = confusion.sum().item()
    hits = confusion.diag()
    predicted, actual = confusion.sum(dim=0), confusion.sum(dim=1)
    precision = torch.where(predicted > 0, hits / predicted.clamp(min=1), torch.zeros_like(hits))
    recall = torch.where(actual > 0, hits / actual.clamp(min=1), torch.zeros_like(hits))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(hits))
    present = actual > 0
    n = max(int(present.sum()), 1)
    return {
        "loss": loss_sum / max(count, 1.0), "top1": hits.sum().item() / max(count, 1.0),
        "top5": top5 / max(count, 1.0), "precision": precision[present].sum().item() / n,
        "recall": recall[present].sum().item() / n, "f1": f1[present].sum().item() / n,
        "samples": int(count),
    }
