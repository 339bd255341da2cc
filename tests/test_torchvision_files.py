"""The files from ``torchvision_files`` load through the real torchvision classes."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, FashionMNIST, VisionDataset
from torchvision_files import (CIFAR10_CLASSES, CIFAR100_CLASSES, trust_written_cifar_files, write_cifar10,
                               write_cifar100, write_fashion_mnist, write_mnist)

Writer = Callable[..., None]

# (dataset class, writer, number of classes, image size, PIL mode, needs md5 trust)
CASES = [
    pytest.param(CIFAR10, write_cifar10, 10, (32, 32), "RGB", True, id="CIFAR10"),
    pytest.param(CIFAR100, write_cifar100, 100, (32, 32), "RGB", True, id="CIFAR100"),
    pytest.param(MNIST, write_mnist, 10, (28, 28), "L", False, id="MNIST"),
    pytest.param(FashionMNIST, write_fashion_mnist, 10, (28, 28), "L", False, id="FashionMNIST"),
]


@pytest.mark.parametrize(("cls", "write", "num_classes", "size", "mode", "trust"), CASES)
def test_loads_through_real_torchvision_class(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    cls: type[VisionDataset],
    write: Writer,
    num_classes: int,
    size: tuple[int, int],
    mode: str,
    trust: bool,
) -> None:
    write(tmp_path, train_size=23, test_size=7, seed=3)
    if trust:
        trust_written_cifar_files(monkeypatch, tmp_path)

    for train, expected_len in ((True, 23), (False, 7)):
        dataset = cls(tmp_path, train=train, download=False)
        assert len(dataset) == expected_len
        assert len(dataset.classes) == num_classes
        labels = []
        for i in range(expected_len):
            image, label = dataset[i]
            assert isinstance(image, Image.Image)
            assert image.size == size
            assert image.mode == mode
            assert isinstance(label, int)
            labels.append(label)
        assert labels == [i % num_classes for i in range(expected_len)]


def test_real_class_names() -> None:
    assert len(CIFAR10_CLASSES) == 10
    assert len(CIFAR100_CLASSES) == len(set(CIFAR100_CLASSES)) == 100
    assert FashionMNIST.classes[0] == "T-shirt/top"  # built into torchvision, not written by us


def test_cifar_classes_come_from_meta_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    write_cifar100(tmp_path)
    trust_written_cifar_files(monkeypatch, tmp_path)
    assert CIFAR10(tmp_path, download=False).classes == CIFAR10_CLASSES
    assert CIFAR100(tmp_path, train=False, download=False).classes == CIFAR100_CLASSES


def test_cifar_pixels_are_channel_planes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Row layout is R plane, G plane, B plane, as in the real files."""
    write_cifar10(tmp_path, train_size=12)
    trust_written_cifar_files(monkeypatch, tmp_path)
    with (tmp_path / "cifar-10-batches-py" / "data_batch_1").open("rb") as f:
        row = pickle.load(f, encoding="latin1")["data"][0]
    image, _ = CIFAR10(tmp_path, download=False)[0]
    assert image.getpixel((0, 0)) == (row[0], row[1024], row[2048])
    assert image.getpixel((31, 0)) == (row[31], row[1024 + 31], row[2048 + 31])


def test_mnist_pixels_match_raw_file(tmp_path: Path) -> None:
    write_mnist(tmp_path, train_size=4, test_size=2)
    raw = (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    assert raw[:16] == bytes.fromhex("00000803" "00000002" "0000001c" "0000001c")
    image, _ = MNIST(tmp_path, train=False, download=False)[1]
    assert np.array_equal(np.asarray(image), np.frombuffer(raw[16 + 784 :], np.uint8).reshape(28, 28))


def test_cifar10_train_size_below_batch_count(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_cifar10(tmp_path, train_size=3, test_size=0)
    trust_written_cifar_files(monkeypatch, tmp_path)
    assert CIFAR10(tmp_path, download=False).targets == [0, 1, 2]
    assert len(CIFAR10(tmp_path, train=False, download=False)) == 0


@pytest.mark.parametrize("write", [write_cifar10, write_cifar100, write_mnist, write_fashion_mnist])
def test_deterministic_from_seed(tmp_path: Path, write: Writer) -> None:
    def snapshot(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    write(tmp_path / "a", seed=1)
    write(tmp_path / "b", seed=1)
    write(tmp_path / "c", seed=2)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    assert snapshot(tmp_path / "a") != snapshot(tmp_path / "c")


@pytest.mark.parametrize("cls", [CIFAR10, CIFAR100])
def test_cifar_md5_is_still_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cls: type[CIFAR10]) -> None:
    """Without trust the real sums reject the files; after trust a changed file is rejected."""
    write_cifar10(tmp_path)
    write_cifar100(tmp_path)
    with pytest.raises(RuntimeError, match="Dataset not found or corrupted"):
        cls(tmp_path, download=False)

    trust_written_cifar_files(monkeypatch, tmp_path)
    cls(tmp_path, download=False)
    first_train_file = tmp_path / cls.base_folder / cls.train_list[0][0]
    first_train_file.write_bytes(first_train_file.read_bytes() + b"\0")
    with pytest.raises(RuntimeError, match="Dataset not found or corrupted"):
        cls(tmp_path, download=False)


def test_trust_requires_written_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        trust_written_cifar_files(monkeypatch, tmp_path)


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (CIFAR10, "Dataset not found or corrupted. You can use download=True to download it"),
        (CIFAR100, "Dataset not found or corrupted. You can use download=True to download it"),
        (MNIST, "Dataset not found. You can use download=True to download it"),
        (FashionMNIST, "Dataset not found. You can use download=True to download it"),
    ],
)
def test_absent_files_error(tmp_path: Path, cls: type[VisionDataset], message: str) -> None:
    """Pins torchvision's behaviour that the project's own error message relies on."""
    with pytest.raises(RuntimeError) as info:
        cls(tmp_path, download=False)
    assert type(info.value) is RuntimeError
    assert str(info.value) == message
