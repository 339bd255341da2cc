"""Random erasing as a device batch stage: with probability ``p`` a sample gets one rectangle of
its normalised image set to zero (torchvision's ``RandomErasing`` with ``value=0``).

Every choice is the sample's own (see :class:`trainer.data.stages.BatchDraw`): whether to erase,
the rectangle's area (``scale`` of the image), its aspect ratio (log-uniform in ``ratio``) and
its place. torchvision tries up to ten rectangles until one fits; here a sample whose one
rectangle does not fit is left as it is, so all samples are drawn at once, on the device.
"""

from __future__ import annotations

import math

import torch

from trainer.data.stages import BatchDraw


class RandomErasing:
    def __init__(self, probability: float, scale: tuple[float, float] = (0.02, 0.33),
                 ratio: tuple[float, float] = (0.3, 3.3)) -> None:
        self.probability, self.scale = probability, scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def __call__(self, images: torch.Tensor, targets: torch.Tensor,
                 draw: BatchDraw) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = images.shape[-2:]
        apply, area, log_ratio, top, left = (draw.per_sample(stream) for stream in range(5))
        area = (self.scale[0] + area * (self.scale[1] - self.scale[0])) * height * width
        aspect = torch.exp(self.log_ratio[0] + log_ratio * (self.log_ratio[1] - self.log_ratio[0]))
        h, w = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
        erase = (apply < self.probability) & (h < height) & (w < width)
        top, left = (top * (height - h + 1)).floor(), (left * (width - w + 1)).floor()
        rows = torch.arange(height, device=images.device).view(1, -1, 1)
        cols = torch.arange(width, device=images.device).view(1, 1, -1)
        inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
                  & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))
        mask = (inside & erase.view(-1, 1, 1)).unsqueeze(1)  # (N, 1, H, W): every channel
        return images.masked_fill(mask, 0.0), targets
