"""A built-in, learnable image-classification data set: one shape per image, written once to disk.

Every image shows a single filled shape (its class) at a random position, size and rotation, in a
random light colour on a random darker background, with mild pixel noise. Colours carry no class
information, so a model has to learn shapes. Images are drawn at a higher resolution and
box-filtered down, so even small shapes stay recognisable at 16-32 pixels. Rotations stay within
+-30 degrees and the shape is always the lighter one: with full rotations and either polarity a
small CNN needs several times more epochs to separate the classes.

:func:`ensure_synthetic_dataset` writes an ImageFolder tree (``root/{train,val}/<class>/*.png``)
under a cache directory the first time and reuses it afterwards. Generation depends only on the
spec (each image has its own generator seeded from ``(seed, split, class, index)``; no global RNG
is used), so every process, rank or machine gets byte-identical files. Trees are built in a
temporary sibling directory and renamed into place, so concurrent callers never see a partial tree.
"""

from __future__ import annotations

import colorsys
import contextlib
import json
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

_SPLITS = ("train", "val")
_MARKER = "DONE.json"
_FORMAT = 2  # bump when the images change, so that old trees are no longer trusted
_SUPERSAMPLE = 4  # draw at 4x the output size, then box-filter down (anti-aliasing)
_SIZE_RANGE = (0.35, 0.80)  # shape diameter as a fraction of the image side
_MAX_ROTATION_DEG = 30.0
_MIN_VALUE_GAP = 0.4  # minimum HSV-value difference between background and (lighter) shape
_NOISE_STD_RANGE = (2.0, 8.0)  # per-image Gaussian noise level, in 0..255 units
_PUBLISH_ATTEMPTS = 5

Point = tuple[float, float]


# --- Shapes: parts in unit coordinates (everything fits in the unit disk), drawn in order. ---


@dataclass(frozen=True)
class _Polygon:
    points: tuple[Point, ...]


@dataclass(frozen=True)
class _Disk:
    centre: Point
    radius: float
    solid: bool = True  # False cuts a hole into what was drawn before


_Part = _Polygon | _Disk


def _regular(sides: int, radius: float = 1.0, phase_deg: float = -90.0) -> _Polygon:
    """A regular polygon centred on the origin, by default with a vertex at the top (y points down)."""
    angles = (math.radians(phase_deg) + 2 * math.pi * k / sides for k in range(sides))
    return _Polygon(tuple((radius * math.cos(a), radius * math.sin(a)) for a in angles))


def _star(tips: int, inner: float) -> _Polygon:
    """A star with ``tips`` points on the unit circle and notches at radius ``inner``."""
    points = _regular(2 * tips).points
    return _Polygon(tuple((x * inner, y * inner) if k % 2 else (x, y) for k, (x, y) in enumerate(points)))


def _plus(half_width: float, arm: float) -> _Polygon:
    """A plus sign with arms reaching ``arm`` from the centre."""
    w, a = half_width, arm
    return _Polygon(((-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
                     (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)))


_GEOMETRY: dict[str, tuple[_Part, ...]] = {
    "circle": (_Disk((0.0, 0.0), 0.85),),
    "square": (_regular(4, phase_deg=45.0),),
    "triangle": (_regular(3),),
    "cross": (_plus(0.3, 0.95),),
    "ring": (_Disk((0.0, 0.0), 0.9), _Disk((0.0, 0.0), 0.5, solid=False)),
    "diamond": (_Polygon(((0.0, -1.0), (0.55, 0.0), (0.0, 1.0), (-0.55, 0.0))),),
    "star": (_star(5, 0.42),),
    "crescent": (_Disk((0.0, 0.0), 0.9), _Disk((0.4, 0.0), 0.72, solid=False)),
    "arrow": (_Polygon(((-0.95, -0.22), (0.15, -0.22), (0.15, -0.6), (0.95, 0.0),
                        (0.15, 0.6), (0.15, 0.22), (-0.95, 0.22))),),
    "heart": (_Disk((-0.4, -0.3), 0.45), _Disk((0.4, -0.3), 0.45),
              _Polygon(((-0.82, -0.12), (0.82, -0.12), (0.0, 0.9)))),
}

SHAPES: tuple[str, ...] = tuple(_GEOMETRY)
"""Class names in class-index order; a spec with ``num_classes=k`` uses the first ``k``."""


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines the generated images (checked by ensure_synthetic_dataset)."""

    num_classes: int = 6
    train_per_class: int = 500
    val_per_class: int = 100
    image_size: int = 32
    seed: int = 0


# --- Rendering ---


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Coverage in [0, 1] of ``shape`` at a random position, size and rotation, as (size, size)."""
    scale = _SUPERSAMPLE * size
    radius = rng.uniform(*_SIZE_RANGE) / 2
    cx, cy = rng.uniform(radius, 1 - radius, size=2)
    angle = math.radians(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
    cos, sin = math.cos(angle), math.sin(angle)

    def to_pixels(x: float, y: float) -> Point:
        return (scale * (cx + radius * (x * cos - y * sin)), scale * (cy + radius * (x * sin + y * cos)))

    canvas = Image.new("L", (scale, scale), 0)
    draw = ImageDraw.Draw(canvas)
    for part in _GEOMETRY[shape]:
        if isinstance(part, _Polygon):
            draw.polygon([to_pixels(x, y) for x, y in part.points], fill=255)
        else:
            px, py = to_pixels(*part.centre)
            r = scale * radius * part.radius
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255 if part.solid else 0)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random (shape, background) RGB pair; the shape's HSV value is higher by _MIN_VALUE_GAP+."""
    dark = rng.uniform(0.0, 1.0 - _MIN_VALUE_GAP)
    light = rng.uniform(dark + _MIN_VALUE_GAP, 1.0)
    hues, saturations = rng.uniform(0.0, 1.0, size=2), rng.uniform(0.0, 1.0, size=2)
    shape, background = (np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0
                         for h, s, v in zip(hues, saturations, (light, dark)))
    return shape, background


def _render(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of ``shape``."""
    alpha = _shape_mask(shape, size, rng)[..., None]
    fg, bg = _colours(rng)
    pixels = bg + alpha * (fg - bg)
    pixels += rng.normal(0.0, rng.uniform(*_NOISE_STD_RANGE), size=pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


# --- The on-disk tree ---


def _validate(spec: SyntheticSpec) -> None:
    """Raise ValueError with one actionable line if a field of ``spec`` is out of range."""
    limits = {
        "num_classes": (2, len(SHAPES)),
        "train_per_class": (1, None),
        "val_per_class": (1, None),
        "image_size": (16, None),
        "seed": (0, None),
    }
    for name, (low, high) in limits.items():
        value = getattr(spec, name)
        wanted = f"between {low} and {high}" if high is not None else f">= {low}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer {wanted}, got {value!r}")
        if value < low or (high is not None and value > high):
            hint = f" (there are {len(SHAPES)} shapes)" if name == "num_classes" else ""
            raise ValueError(f"{name} must be {wanted}{hint}, got {value}")


def _tree_name(spec: SyntheticSpec) -> str:
    return (f"shapes-c{spec.num_classes}-n{spec.train_per_class}-v{spec.val_per_class}"
            f"-s{spec.image_size}-seed{spec.seed}")


def _marker(spec: SyntheticSpec) -> dict[str, Any]:
    return {"format": _FORMAT, "spec": asdict(spec)}


def _is_complete(root: Path, spec: SyntheticSpec) -> bool:
    """Whether ``root`` holds a finished tree for ``spec`` (its marker is written last)."""
    try:
        return json.loads((root / _MARKER).read_text()) == _marker(spec)
    except (OSError, ValueError):
        return False


def _write_tree(root: Path, spec: SyntheticSpec) -> None:
    """Write every image of ``spec`` under the existing empty directory ``root``, marker last."""
    counts = (spec.train_per_class, spec.val_per_class)
    for split_index, (split, count) in enumerate(zip(_SPLITS, counts)):
        for class_index, shape in enumerate(SHAPES[: spec.num_classes]):
            folder = root / split / shape
            folder.mkdir(parents=True)
            for index in range(count):
                rng = np.random.default_rng((spec.seed, split_index, class_index, index))
                image = Image.fromarray(_render(shape, spec.image_size, rng))
                image.save(folder / f"{index:05d}.png", format="PNG")
    (root / _MARKER).write_text(json.dumps(_marker(spec), indent=2) + "\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _discard_incomplete(root: Path, spec: SyntheticSpec) -> None:
    """Move an incomplete ``root`` out of the way atomically, then delete it."""
    trash = root.with_name(f".{root.name}.trash-{uuid.uuid4().hex}")
    try:
        os.rename(root, trash)
    except FileNotFoundError:
        return  # another process already moved it
    if _is_complete(trash, spec):  # completed by another process in the meantime: put it back
        with contextlib.suppress(OSError):
            os.rename(trash, root)
            return
    _remove(trash)


def _publish(tmp: Path, root: Path, spec: SyntheticSpec) -> None:
    """Rename the finished ``tmp`` to ``root`` unless a complete tree is already there."""
    for _ in range(_PUBLISH_ATTEMPTS):
        try:
            os.rename(tmp, root)  # atomic; fails if ``root`` is a non-empty directory
            return
        except OSError:
            if _is_complete(root, spec):
                return  # another process finished first; the caller discards ``tmp``
            if not os.path.lexists(root):
                raise
            _discard_incomplete(root, spec)
    raise RuntimeError(f"synthetic data: could not move {tmp} to {root} after "
                       f"{_PUBLISH_ATTEMPTS} attempts; is another program writing there?")


def ensure_synthetic_dataset(cache_dir: str | os.PathLike[str], spec: SyntheticSpec) -> Path:
    """Return the root of an ImageFolder tree (root/train/<class>/*.png, root/val/<class>/*.png) for spec, generating it if absent.

    The root is ``cache_dir/<name encoding the spec>``. A complete tree is never modified; one
    without its marker file (interrupted or damaged) is replaced. Safe to call from several
    processes at once: each generates into its own temporary directory, the first rename wins and
    the others discard their copy. Raises ValueError, with one actionable line, for an invalid spec.
    """
    _validate(spec)
    cache = Path(cache_dir).expanduser()
    root = cache / _tree_name(spec)
    if _is_complete(root, spec):
        return root
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{root.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()  # unlike tempfile.mkdtemp, honours the umask (shared caches stay readable)
    try:
        _write_tree(tmp, spec)
        _publish(tmp, root, spec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left once renamed into place
    return root
