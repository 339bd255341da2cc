"""Validation: a model's metrics over the whole validation set, every sample counted once across
ranks, reduced once at the end by the task's meter."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from trainer.data.stages import DeviceStages
from trainer.errors import DataError, OutOfMemory
from trainer.parallel.strategy import Parallel
from trainer.tasks.base import Task
from trainer.train.micro_batch import MicroBatches
from trainer.train.precision import Precision


@torch.inference_mode()
def evaluate_model(model: nn.Module, loader: DataLoader, task: Task, num_classes: int, stages: DeviceStages,
                   precision: Precision, group: dist.ProcessGroup | None = None,
                   stop: Callable[[], bool] = lambda: False, observer: Any = None,
                   forwards: int | None = None, cut: MicroBatches | None = None) -> tuple[dict[str, float], int]:
    """``model``'s metrics over ``loader`` (reduced over every rank) and the bad samples skipped here.

    ``stop()`` is checked before each batch: a rank told to stop leaves early, so the metrics are
    then partial (the caller discards them). It needs no agreement between ranks (but the one
    after each forward under auto): the only other collective is the reduction at the end, which
    every rank reaches either way. A model whose
    forward is itself a collective (sharded) must run ``forwards`` times on every rank: a rank
    with fewer batches, a stop or unreadable batches makes up the difference on a blank image.
    ``observer`` (the task's evidence, on every rank or none) sees each batch as loaded (uint8
    from our transforms), then the reduced meter. With ``cut`` under ``train.micro_batch=auto`` the
    batches run in pieces (see :func:`_evaluate_in_pieces`).
    """
    model.eval()
    meter, skipped, done, shape = task.meter(num_classes, stages.device), 0, 0, None
    if cut is not None and cut.auto:
        skipped = _evaluate_in_pieces(model, loader, meter, stages, precision, stop, observer, cut)
    else:
        for batch in stages.batches(loader):
            if stop():
                break
            skipped += batch.skipped
            if not len(batch.targets):  # every sample unreadable
                continue
            images, targets = stages.copy(batch)
            shape = images.shape[1:]
            with precision.autocast(stages.device):
                logits = model(stages.normalize(images)).float()
            done += 1
            meter.update(logits, targets)
            if observer is not None:
                observer.update(images, logits, targets)
    if forwards is not None and done < forwards:
        blank = torch.zeros(1, *(shape or _image_shape(loader)), device=stages.device)
        for _ in range(forwards - done):
            with precision.autocast(stages.device):
                model(blank)
    metrics = meter.reduce(group)
    if observer is not None:
        observer.finish(meter)
    return metrics, skipped


def _evaluate_in_pieces(model: nn.Module, loader: DataLoader, meter: Any, stages: DeviceStages, precision: Precision,
                        stop: Callable[[], bool], observer: Any, cut: MicroBatches) -> int:
    """Each batch in ``cut.pieces`` pieces, one agreement per forward on every rank; the ranks go on
    in rounds until none has a piece left (a rank with fewer batches, or stopped, joins with none).
    A forward out of memory anywhere doubles the pieces everywhere and that piece runs again, halved.
    Returns the unreadable samples skipped here."""
    batches, skipped, current, piece = iter(stages.batches(loader)), 0, None, 0
    while True:
        while current is None and not stop() and (batch := next(batches, None)) is not None:
            skipped += batch.skipped
            if len(batch.targets):
                current, piece = stages.copy(batch), 0
        logits, failed, start = None, False, 0
        if current is not None:
            images, targets = current
            start, end = cut.span(len(targets), piece)
            if end > start:
                try:
                    with precision.autocast(stages.device):
                        logits = model(stages.normalize(images[start:end])).float()
                except torch.OutOfMemoryError:
                    failed = True
        halved, more = cut.agree(failed, more=current is not None)
        if not more:
            return skipped
        if halved:
            logits, piece = None, piece * 2
            continue
        if logits is not None:
            meter.update(logits, targets[start:end])
            if observer is not None:
                observer.update(images[start:end], logits, targets[start:end])
        if current is not None:
            piece += 1
            if piece == cut.pieces:
                current = None


class Validation:
    """The Worker's validation: the same loader, task and stages each epoch, for the model or its EMA."""

    def __init__(self, loader: DataLoader, task: Task, num_classes: int, stages: DeviceStages,
                 precision: Precision, parallel: Parallel, group: dist.ProcessGroup | None,
                 stop: Callable[[], bool], cut: MicroBatches | None = None) -> None:
        self.loader, self.task, self.num_classes, self.stages, self.cut = loader, task, num_classes, stages, cut
        self.precision, self.parallel, self.group, self.stop = precision, parallel, group, stop

    def __call__(self, model: nn.Module, observer: Any = None) -> tuple[dict[str, float], int]:
        """Metrics of ``model`` and the unreadable samples skipped on this rank.

        Every rank first takes rank 0's buffers (BatchNorm statistics, EMA-averaged buffers): each
        rank updated its own in its last steps, and rank 0's are the ones the checkpoint keeps, so
        the logged metrics are the saved model's (what ``trainer.evaluate`` reports). A stop signal
        cuts the validation short (the partial metrics are then not logged).
        """
        self.parallel.agree_buffers(model)
        try:
            return evaluate_model(model, self.loader, self.task, self.num_classes, self.stages, self.precision,
                                  self.group, self.stop, observer, self._forwards(), self.cut)
        except torch.OutOfMemoryError:
            batch = self.loader.batch_size
            raise OutOfMemory(f"{self.stages.device} ran out of memory in validation at batch {batch} per process; "
                              f"set data.val_batch_size={max(1, (batch or 2) // 2)}") from None

    def _forwards(self) -> int | None:
        """The most batches any rank evaluates (rank 0's: the validation sampler gives the lower
        ranks the extra samples), when the model's forward is a collective."""
        if not self.parallel.collective_forward:
            return None
        world, size, batch = self.parallel.env.world_size, len(self.loader.dataset), self.loader.batch_size or 1
        return math.ceil(len(range(0, size, world)) / batch)


def _image_shape(loader: DataLoader) -> torch.Size:
    """The shape of one validation image (for a rank that evaluated none)."""
    sample = loader.dataset[(0, 0)]
    if sample is None:
        raise DataError("this rank has no readable validation sample, and the first one (index 0) cannot be "
                        "read to size the blank forwards that keep the ranks in step: fix that sample or "
                        "validate on fewer processes")
    return torch.Size(sample[0].shape)  # a tensor, or an encoded JPEG's decoded shape
