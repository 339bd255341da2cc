"""uint8 batches to normalised floats, on the device: the one place that applies data.mean/std.

Loader workers return uint8 images (see :mod:`trainer.data.decode`); every consumer of the loaders
(the training step, evaluation, prediction, the pictures of a run) calls :class:`Normalize` once
the batch is on its device. A user's data set that yields float tensors is taken as already
normalised and passes unchanged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class Normalize:
    """``(x / 255 - mean) / std`` for uint8 batches, the same operations as torchvision's
    ``ToTensor`` + ``Normalize`` (so the same values); any other dtype passes as is."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images on the device; the memory format (channels_last) is kept."""
        if images.dtype != torch.uint8:
            return images
        return images.float().div_(255).sub_(self.mean).div_(self.std)

    def to_pixels(self, images: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) images, uint8 or normalised floats, as displayable (N, H, W, C) uint8."""
        images = images.cpu()
        if images.dtype != torch.uint8:
            pixels = (images.float() * self.std.cpu() + self.mean.cpu()).clamp(0, 1) * 255
            images = pixels.round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).numpy()
