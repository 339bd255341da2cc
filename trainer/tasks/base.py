"""The Task seam: what is learnt and how it is scored.

A Task owns the loss, the form of the targets (class indices, soft or multi-hot vectors), the
evaluation meter and its metric names, and what the pictures of a validation show. Nothing
else in the trainer assumes integer labels. ``task.name`` picks a built-in one or names a
user's builder by import path (``my_pkg.tasks:build``, called with the whole config).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist

from trainer.observe.visuals import Evidence
from trainer.parallel.distributed import DistEnv


class EvalMeter(Protocol):
    """Accumulates one validation on the device; :meth:`reduce` is one collective, on every rank,
    and gives the same numbers whatever the world size."""

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None: ...

    def reduce(self, group: dist.ProcessGroup | None = None) -> dict[str, float]: ...

    def rows(self, classes: list[str]) -> list[dict[str, Any]]:
        """One row of per-class scores per class (after :meth:`reduce`)."""
        ...


class Task(Protocol):
    """What a task provides (see trainer.tasks.classification for the simplest one)."""

    name: str
    target_form: str
    """``index`` (one class per sample, int64) or ``multi_hot`` (a float per class): how the data
    sources make targets (a multi-label image folder reads its label files)."""
    metrics: tuple[str, ...]
    """What each validation logs as ``val/<name>``; the first judges the run (``ckpt.metric=auto``)."""

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss, a mean over the micro-batch (fp32 logits). ``targets`` are in the
        task's ``target_form``, or (N, classes) class probabilities when mixup or cutmix is on
        (``data.mixup_alpha``, ``data.cutmix_alpha``: see trainer.data.mixing)."""
        ...

    def meter(self, num_classes: int, device: torch.device) -> EvalMeter: ...

    def stand_in_targets(self, count: int, num_classes: int) -> torch.Tensor:
        """Targets for a zero-weight stand-in batch (see trainer.train.bad_batches), as the loader makes them."""
        ...

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """What ``predict`` prints per class: softmax for one label per image, sigmoid for several."""
        ...

    def caption(self, target: torch.Tensor, classes: list[str]) -> str:
        """A sample's target in words, under its picture."""
        ...

    def summary(self, metrics: dict[str, float]) -> str:
        """The validation part of the epoch's log line."""
        ...

    def evidence(self, env: DistEnv, to_pixels: Callable[[torch.Tensor], np.ndarray],
                 classes: list[str]) -> Evidence | None:
        """An observer for the pictures of one validation, or None if the task draws none."""
        ...

