"""Mixup and cutmix as a device batch stage: each sample is mixed with its neighbour in the
micro-batch (``roll(1, 0)``, the pairing of torchvision's ``v2.MixUp`` and ``v2.CutMix``), and
its target with the neighbour's, in proportion to what each contributes.

Per micro-batch, with probability ``prob``, one of the two is applied: cutmix with probability
``switch_prob`` when both alphas are set, else the one that is (timm's ``Mixup``). The draws are
the micro-batch's (see :meth:`trainer.data.stages.BatchDraw.per_batch`): whether and which from one
stream, the ratio and the box from another, drawn as torchvision draws them, so a generator in the
same state gives torchvision's ratio and box. The mixing itself is :func:`blend` and :func:`paste`,
pure functions of the ratio or the box.

Targets leave as class probabilities, (N, classes) floats, whether or not the batch was mixed:
the task's loss always sees one form (see :mod:`trainer.tasks.classification`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.data.stages import BatchDraw
from trainer.errors import ConfigError

CHOICE_STREAM, RATIO_STREAM = 0, 1
"""The per-batch streams: whether and which; the ratio and the box."""

Box = tuple[int, int, int, int]
"""``(x1, y1, x2, y2)``: columns x1..x2-1 and rows y1..y2-1, torchvision's ``CutMix`` box."""


def soft_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices as one-hot floats (torchvision's encoding); (N, classes) targets (multi-hot or
    already soft) as floats."""
    if targets.ndim == 1 and not targets.is_floating_point():
        targets = nn.functional.one_hot(targets, num_classes)
    if targets.ndim != 2 or targets.shape[1] != num_classes:
        raise ConfigError(f"data.mixup_alpha/data.cutmix_alpha: mixing needs class indices or (N, {num_classes}) "
                          f"targets, the task gave shape {tuple(targets.shape)}; set both to 0 for this task")
    return targets if targets.is_floating_point() else targets.float()


def _with_neighbour(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """``ratio`` of each row plus ``1 - ratio`` of the row before it (the first: the last row's),
    in torchvision's order of operations."""
    return x.roll(1, 0).mul_(1.0 - ratio).add_(x.mul(ratio))


def blend(images: torch.Tensor, targets: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup with ratio ``ratio``: images and (soft) targets blended with their neighbours'."""
    return _with_neighbour(images, ratio), _with_neighbour(targets, ratio)


def paste(images: torch.Tensor, targets: torch.Tensor, box: Box) -> tuple[torch.Tensor, torch.Tensor]:
    """Cutmix: the neighbour's pixels inside ``box``; the targets weighted by the area each keeps."""
    x1, y1, x2, y2 = box
    height, width = images.shape[-2:]
    pasted = images.clone()
    pasted[..., y1:y2, x1:x2] = images.roll(1, 0)[..., y1:y2, x1:x2]
    kept = float(1.0 - (x2 - x1) * (y2 - y1) / (width * height))
    return pasted, _with_neighbour(targets, kept)


def draw_ratio(alpha: float, generator: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw on the CPU: what ``torch.distributions.Beta`` (torchvision's draw)
    samples, through the function it calls, which takes a generator."""
    concentration = torch.tensor([[alpha, alpha]])
    return float(torch._sample_dirichlet(concentration, generator=generator)[0, 0])


def draw_box(ratio: float, height: int, width: int, generator: torch.Generator) -> Box:
    """torchvision's ``CutMix`` box for ``ratio``: centred on a uniform pixel, sides
    ``sqrt(1 - ratio)`` of the image's, clipped to it."""
    centre_x = int(torch.randint(width, (1,), generator=generator))
    centre_y = int(torch.randint(height, (1,), generator=generator))
    half = 0.5 * math.sqrt(1.0 - ratio)
    half_w, half_h = int(half * width), int(half * height)
    return (max(centre_x - half_w, 0), max(centre_y - half_h, 0),
            min(centre_x + half_w, width), min(centre_y + half_h, height))


class Mixing:
    """The stage: ``prob`` of a micro-batch is mixed, by cutmix (``switch_prob`` of those when both
    alphas are > 0) or mixup; an alpha of 0 turns that one off."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, prob: float = 1.0,
                 switch_prob: float = 0.5) -> None:
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob

    def choose(self, draw: BatchDraw) -> str | None:
        """``mixup``, ``cutmix`` or None (left as it is) for this micro-batch."""
        apply, switch = torch.rand(2, generator=draw.per_batch(CHOICE_STREAM)).tolist()
        if apply >= self.prob:
            return None
        if self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or switch < self.switch_prob):
            return "cutmix"
        return "mixup"

    def __call__(self, images: torch.Tensor, targets: torch.Tensor,
                 draw: BatchDraw) -> tuple[torch.Tensor, torch.Tensor]:
        targets = soft_targets(targets, self.num_classes)
        chosen = self.choose(draw)
        if chosen is None:
            return images, targets
        generator = draw.per_batch(RATIO_STREAM)
        if chosen == "mixup":
            return blend(images, targets, draw_ratio(self.mixup_alpha, generator))
        ratio = draw_ratio(self.cutmix_alpha, generator)
        return paste(images, targets, draw_box(ratio, images.shape[-2], images.shape[-1], generator))
