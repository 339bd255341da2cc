"""A photo-like ImageFolder of JPEGs, generated once into a cache folder and reused.

Each image is a few hundred pixels on a side (sizes vary), with smooth large-scale shading, a
mid-frequency texture and pixel noise, saved at JPEG quality 90: decoding it costs what decoding
a camera photo of that size costs, unlike a flat synthetic image that compresses to almost nothing.
The content is a pure function of (seed, split, class, index); the tree is written to a temporary
sibling folder and renamed into place, so a concurrent or interrupted run never sees half of it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FORMAT = 1  # bump when the images change, so that cached trees are rebuilt
MARKER = "DONE.json"


@dataclass(frozen=True)
class PhotoSet:
    classes: int = 10
    train_per_class: int = 64
    val_per_class: int = 2
    min_side: int = 300
    max_side: int = 480
    seed: int = 0

    @property
    def name(self) -> str:
        return (f"bench-photos-v{FORMAT}-{self.classes}c-{self.train_per_class}x{self.val_per_class}-"
                f"{self.min_side}to{self.max_side}px-s{self.seed}")


def ensure(spec: PhotoSet, cache_dir: str | os.PathLike) -> Path:
    """The tree's root (``root/{train,val}/<class>/*.jpg``), generating it on first use."""
    root = Path(os.path.expanduser(cache_dir)) / spec.name
    if (root / MARKER).is_file():
        return root
    staging = root.with_name(f".{root.name}.{uuid.uuid4().hex}")
    try:
        for split, count in (("train", spec.train_per_class), ("val", spec.val_per_class)):
            for label in range(spec.classes):
                folder = staging / split / f"class_{label:02d}"
                folder.mkdir(parents=True)
                for index in range(count):
                    rng = np.random.default_rng([spec.seed, split == "val", label, index])
                    photo(rng, label, spec.min_side, spec.max_side).save(folder / f"{index:05d}.jpg", quality=90)
        (staging / MARKER).write_text(json.dumps(asdict(spec)))
        try:
            staging.rename(root)
        except OSError:  # another process published it first
            if not (root / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def photo(rng: np.random.Generator, label: int, min_side: int, max_side: int) -> Image.Image:
    """One image: a class tint over smooth shading, a random-phase texture and Gaussian noise."""
    width, height = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    shading = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC)
    texture = Image.fromarray(rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR)
    tint = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.float32)
    pixels = (0.5 * np.asarray(shading, dtype=np.float32) + 0.3 * np.asarray(texture, dtype=np.float32)
              + 0.2 * tint + rng.normal(0.0, 12.0, size=(height, width, 3)))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
