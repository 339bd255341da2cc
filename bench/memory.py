"""``data.source=bench.memory:build``: random image tensors held in memory, a user data source.

The Worker takes tensor samples as they are (no decode, no augmentation), so the bench can time
its training step through ``python -m trainer`` alone. Sizes come from the public config keys of
the synthetic set: ``data.synthetic_classes``, ``data.synthetic_train_per_class``,
``data.synthetic_val_per_class`` and ``data.image_size``. ``bench/plain_loop.py --memory`` builds
the same tensors without this package.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset


def tensors(classes: int, per_class: int, image_size: int, seed: int) -> TensorDataset:
    """``classes x per_class`` random images with random labels; a pure function of the arguments."""
    generator = torch.Generator().manual_seed(seed)
    count = classes * per_class
    images = torch.randn(count, 3, image_size, image_size, generator=generator)
    return TensorDataset(images, torch.randint(0, classes, (count,), generator=generator))


class LabelsAsInts(torch.utils.data.Dataset):
    """(image tensor, int label): the sample format of an ImageFolder, with tensors for images."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.data[index]
        return image, int(label)


def build(cfg: Any) -> tuple[LabelsAsInts, LabelsAsInts, list[str]]:
    """The ``data.source`` entry point: (train, val, class names)."""
    classes = cfg.synthetic_classes
    train = tensors(classes, cfg.synthetic_train_per_class, cfg.image_size, seed=0)
    val = tensors(classes, cfg.synthetic_val_per_class, cfg.image_size, seed=1)
    return LabelsAsInts(train), LabelsAsInts(val), [f"class_{i}" for i in range(classes)]
