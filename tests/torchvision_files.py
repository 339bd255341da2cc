"""Tiny data sets written in torchvision's exact on-disk formats.

The writers below produce small, deterministic stand-ins for CIFAR-10,
CIFAR-100, MNIST and Fashion-MNIST that the *real* ``torchvision.datasets``
classes load with ``download=False``. Nothing in torchvision is replaced:
the files follow the layouts that ``torchvision/datasets/cifar.py`` and
``torchvision/datasets/mnist.py`` read.

* CIFAR: pickled dicts under ``<root>/cifar-10-batches-py/`` and
  ``<root>/cifar-100-python/``. torchvision checks every CIFAR file against a
  hard-coded md5, so tests must also call :func:`trust_written_cifar_files`.
* MNIST / Fashion-MNIST: uncompressed big-endian IDX files under
  ``<root>/<ClassName>/raw/``. torchvision only checks that they exist.

Images are uniform random bytes from ``numpy.random.default_rng`` seeded with
``(seed, split)``, so train and test differ and a given seed always gives the
same bytes (and so the same md5). Labels are ``index % num_classes``.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100

if TYPE_CHECKING:
    import pytest

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "write_cifar10",
    "write_cifar100",
    "write_mnist",
    "write_fashion_mnist",
    "trust_written_cifar_files",
]

CIFAR10_CLASSES: list[str] = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip

CIFAR100_CLASSES: list[str] = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
    "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel",
    "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse",
    "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea",
    "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip",
    "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]  # fmt: skip

CIFAR100_COARSE_CLASSES: list[str] = [
    "aquatic_mammals", "fish", "flowers", "food_containers",
    "fruit_and_vegetables", "household_electrical_devices",
    "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals",
    "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
]  # fmt: skip

_CIFAR_SIDE = 32
_MNIST_SIDE = 28
_CIFAR10_TRAIN_BATCHES = 5
# IDX magic: two zero bytes, the element type (0x08 = unsigned byte), the rank.
_IDX_UBYTE_RANK1 = 0x00000801
_IDX_UBYTE_RANK3 = 0x00000803
_SPLIT_STREAM = {"train": 0, "test": 1}


def _images(seed: int, split: str, shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic uint8 pixels for one split."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _labels(start: int, count: int, num_classes: int) -> list[int]:
    """Labels ``i % num_classes`` for global sample indices ``start .. start+count-1``."""
    return [i % num_classes for i in range(start, start + count)]


def _dump(path: Path, obj: dict[str, Any]) -> None:
    # Protocol 2 matches the age of the originals; torchvision unpickles with
    # encoding="latin1", which is harmless for files written by Python 3.
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def _check_sizes(train_size: int, test_size: int) -> None:
    if train_size < 0 or test_size < 0:
        raise ValueError(f"sizes must be >= 0, got train_size={train_size}, test_size={test_size}")


def _cifar_rows(seed: int, split: str, count: int) -> np.ndarray:
    """``count`` images as CIFAR rows: 3072 bytes each, the R, G then B 32x32 planes."""
    return _images(seed, split, (count, 3 * _CIFAR_SIDE * _CIFAR_SIDE))


def write_cifar10(root: Path, train_size: int = 50, test_size: int = 20, seed: int = 0) -> None:
    """Write ``<root>/cifar-10-batches-py`` as ``torchvision.datasets.CIFAR10`` reads it.

    The training samples are spread over ``data_batch_1`` .. ``data_batch_5`` in order
    (torchvision concatenates them), so sample ``i`` of either split has label ``i % 10``.
    Call :func:`trust_written_cifar_files` before loading.
    """
    _check_sizes(train_size, test_size)
    folder = Path(root) / CIFAR10.base_folder
    folder.mkdir(parents=True, exist_ok=True)

    train = _cifar_rows(seed, "train", train_size)
    start = 0
    for number, rows in enumerate(np.array_split(train, _CIFAR10_TRAIN_BATCHES), start=1):
        _dump(
            folder / f"data_batch_{number}",
            {
                "batch_label": f"training batch {number} of {_CIFAR10_TRAIN_BATCHES}",
                "labels": _labels(start, len(rows), 10),
                "data": rows,
                "filenames": [f"sample_{i:05d}.png" for i in range(start, start + len(rows))],
            },
        )
        start += len(rows)

    _dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": _labels(0, test_size, 10),
            "data": _cifar_rows(seed, "test", test_size),
            "filenames": [f"sample_{i:05d}.png" for i in range(test_size)],
        },
    )
    _dump(
        folder / "batches.meta",
        {
            "num_cases_per_batch": -(-train_size // _CIFAR10_TRAIN_BATCHES),
            "label_names": list(CIFAR10_CLASSES),
            "num_vis": 3 * _CIFAR_SIDE * _CIFAR_SIDE,
        },
    )


def write_cifar100(root: Path, train_size: int = 50, test_size: int = 20, seed: int = 0) -> None:
    """Write ``<root>/cifar-100-python`` as ``torchvision.datasets.CIFAR100`` reads it.

    Sample ``i`` has fine label ``i % 100``. Coarse labels (which torchvision ignores)
    are ``fine // 5``, not the real CIFAR-100 super-class grouping.
    Call :func:`trust_written_cifar_files` before loading.
    """
    _check_sizes(train_size, test_size)
    folder = Path(root) / CIFAR100.base_folder
    folder.mkdir(parents=True, exist_ok=True)

    for split, name, count, batch_label in (
        ("train", "train", train_size, "training batch 1 of 1"),
        ("test", "test", test_size, "testing batch 1 of 1"),
    ):
        fine = _labels(0, count, 100)
        _dump(
            folder / name,
            {
                "filenames": [f"sample_{i:05d}.png" for i in range(count)],
                "batch_label": batch_label,
                "fine_labels": fine,
                "coarse_labels": [label // 5 for label in fine],
                "data": _cifar_rows(seed, split, count),
            },
        )
    _dump(
        folder / "meta",
        {
            "fine_label_names": list(CIFAR100_CLASSES),
            "coarse_label_names": list(CIFAR100_COARSE_CLASSES),
        },
    )


def _write_idx_ubyte(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an uncompressed IDX file (big-endian header)."""
    magic = {1: _IDX_UBYTE_RANK1, 3: _IDX_UBYTE_RANK3}[array.ndim]
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _write_mnist_like(class_name: str, root: Path, train_size: int, test_size: int, seed: int) -> None:
    _check_sizes(train_size, test_size)
    raw = Path(root) / class_name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, prefix, count in (("train", "train", train_size), ("test", "t10k", test_size)):
        images = _images(seed, split, (count, _MNIST_SIDE, _MNIST_SIDE))
        labels = np.asarray(_labels(0, count, 10), dtype=np.uint8)
        _write_idx_ubyte(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx_ubyte(raw / f"{prefix}-labels-idx1-ubyte", labels)


def write_mnist(root: Path, train_size: int = 50, test_size: int = 20, seed: int = 0) -> None:
    """Write ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``.

    Sample ``i`` has label ``i % 10``. torchvision only checks that the four files
    exist, so no md5 patching is needed.
    """
    _write_mnist_like("MNIST", root, train_size, test_size, seed)


def write_fashion_mnist(root: Path, train_size: int = 50, test_size: int = 20, seed: int = 0) -> None:
    """Write ``<root>/FashionMNIST/raw/...``, in the same layout as :func:`write_mnist`."""
    _write_mnist_like("FashionMNIST", root, train_size, test_size, seed)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def trust_written_cifar_files(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make torchvision's CIFAR classes accept the files written under ``root``.

    Why this exists: ``CIFAR10``/``CIFAR100`` compare the md5 of every file with
    sums hard-coded in the class attributes ``train_list``, ``test_list`` and
    ``meta``, and fail with "Dataset not found or corrupted" otherwise. Small
    synthetic files cannot have the real sums. Instead of turning the check off,
    this swaps in the md5s of the files actually on disk, for the duration of the
    test (undone by ``monkeypatch``). The integrity check still runs, so loading
    fails if a file is missing or changed afterwards; nothing else is patched.

    Each class is patched only if its folder (``cifar-10-batches-py`` or
    ``cifar-100-python``) exists under ``root``. The patch lives in this process:
    a trainer started as a subprocess does not see it.
    """
    patched = False
    for cls in (CIFAR10, CIFAR100):
        folder = Path(root) / cls.base_folder
        if not folder.is_dir():
            continue
        monkeypatch.setattr(cls, "train_list", [[name, _md5(folder / name)] for name, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[name, _md5(folder / name)] for name, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})
        patched = True
    if not patched:
        raise FileNotFoundError(
            f"no {CIFAR10.base_folder!r} or {CIFAR100.base_folder!r} folder under {root}; write the files first"
        )
