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

STAND_IN_SIZE = 2
"""Samples in a stand-in batch: two, so that BatchNorm layers over (N, C) accept it."""


class StandIn:
    """Swaps an empty (all-unreadable) batch for a zero batch shaped like the real ones."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], image_size: int) -> None:
        self.transform, self.image_size = transform, image_size
        self.like: torch.Tensor | None = None  # one sample of the last readable batch (its shape and dtype)

    def swap(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(images, targets, False)`` for a readable batch; a stand-in ``(zeros, zeros, True)`` for an empty one."""
        if targets.numel() > 0:
            if self.like is None:
                self.like = torch.zeros_like(images[0])
            return images, targets, False
        if self.like is None:  # the first batch: what the transform makes of a blank image
            self.like = torch.zeros_like(self.transform(Image.new("RGB", (self.image_size, self.image_size))))
        images = self.like.unsqueeze(0).expand(STAND_IN_SIZE, *self.like.shape).contiguous()
        return images, torch.zeros(STAND_IN_SIZE, dtype=torch.long), True
