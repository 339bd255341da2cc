"""A micro-batch whose every sample was unreadable (``data.on_bad_sample=skip``).

Such a rank cannot leave the step out: under DDP the others would wait for its gradients in the
all-reduce, forever. Asking the other ranks first would cost a collective on every step. Instead
the rank trains a stand-in batch with zero weight (:meth:`TrainStep.micro_batch` with
``stand_in=True``): its all-reduce matches, it adds nothing to the gradients, the model runs it in
eval mode so BatchNorm statistics are untouched, and the meters do not count it. The other ranks'
samples still train. A single process, which has nobody to wait for, skips an optimizer step whose
accumulation window held only stand-ins (see ``TrainStep``).
"""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image

from trainer.data.stages import Batch

STAND_IN_SIZE = 2
"""Samples in a stand-in batch: two, so that BatchNorm layers over (N, C) accept it."""


class StandIn:
    """Swaps an empty (all-unreadable) batch for a zero batch shaped like the real ones, with the
    task's targets for it (``targets(count)``)."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], image_size: int,
                 targets: Callable[[int], torch.Tensor]) -> None:
        self.transform, self.image_size, self.targets = transform, image_size, targets
        self.like: torch.Tensor | None = None  # one sample of the last readable batch (its shape and dtype)

    def swap(self, batch: Batch) -> tuple[Batch, bool]:
        """``(batch, False)`` for a readable batch; a stand-in ``(zeros, True)`` for an empty one."""
        if batch.targets.numel() > 0:
            if self.like is None:
                self.like = torch.zeros_like(batch.images[0])
            return batch, False
        if self.like is None:  # the first batch: what the transform makes of a blank image
            self.like = torch.zeros_like(self.transform(Image.new("RGB", (self.image_size, self.image_size))))
        images = self.like.unsqueeze(0).expand(STAND_IN_SIZE, *self.like.shape).contiguous()
        indices = torch.zeros(STAND_IN_SIZE, dtype=torch.long)
        return Batch(images, self.targets(STAND_IN_SIZE), batch.skipped, indices), True
