"""Augmentation policies in the loader workers (``data.auto_augment``): torchvision's own
AutoAugment, RandAugment, TrivialAugmentWide and AugMix on the training crop, a PIL image, after the
flip and before the conversion to a tensor, where torchvision's classification reference
(``references/classification/presets.py``) places them, with its bilinear interpolation.

They draw from the torch RNG, which :class:`trainer.data.loaders.SeededTransformDataset` seeds for
each sample, so a policy's choices are a pure function of (seed, epoch, index, repeat), like the crop's.
"""

from __future__ import annotations

from typing import Callable

from PIL import Image
from torchvision.transforms import (AugMix, AutoAugment, AutoAugmentPolicy, InterpolationMode, RandAugment,
                                    TrivialAugmentWide)

from trainer.config import DataConfig


def build_policy(cfg: DataConfig) -> Callable[[Image.Image], Image.Image] | None:
    """The configured policy, or None for ``data.auto_augment=none``."""
    bilinear = InterpolationMode.BILINEAR
    if cfg.auto_augment == "autoaugment":
        return AutoAugment(AutoAugmentPolicy(cfg.autoaugment_policy), interpolation=bilinear)
    if cfg.auto_augment == "randaugment":
        return RandAugment(cfg.randaugment_ops, cfg.randaugment_magnitude, interpolation=bilinear)
    if cfg.auto_augment == "trivialaugment":
        return TrivialAugmentWide(interpolation=bilinear)
    if cfg.auto_augment == "augmix":
        return AugMix(cfg.augmix_severity, interpolation=bilinear)
    return None
