"""Each data source through the real loaders: synthetic, ImageFolder, CIFAR-10 and MNIST files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from torchvision_files import trust_written_cifar_files, write_cifar10, write_mnist
from trainer import config, data
from trainer.errors import DataError


def data_cfg(**overrides: object) -> config.DataConfig:
    cfg = config.load([], [f"data.{k}={v}" for k, v in overrides.items()])
    return cfg.data


def first_batch(cfg: config.DataConfig, split: str = "train", workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    splits = data.load_splits(cfg)
    base = splits.train if split == "train" else splits.val
    dataset = data.SeededTransformDataset(base, data.build_transform(cfg, split == "train"), seed=0)
    batches = data.TrainBatchSampler(len(dataset), 1, 0, batch_size=8, seed=0)
    cfg.num_workers = workers
    loader = data.build_train_loader(dataset, batches, cfg, torch.device("cpu"), seed=0)
    images, targets, skipped = next(iter(loader))
    assert skipped == 0
    return images, targets


def write_image_folder(root: Path, classes: dict[str, list[str]], per_class: int = 4) -> None:
    for split, names in classes.items():
        for index, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (20, 24), (40 * index, 10 * i, 200)).save(folder / f"{i}.png")


def test_synthetic_source_loads_shapes(tmp_path: Path) -> None:
    cfg = data_cfg(cache_dir=tmp_path, synthetic_classes=4, synthetic_train_per_class=6,
                   synthetic_val_per_class=3, image_size=16)
    data.prepare(cfg)
    splits = data.load_splits(cfg)
    assert len(splits.train) == 24 and len(splits.val) == 12
    assert splits.classes == sorted(splits.classes) and len(splits.classes) == 4
    images, targets = first_batch(cfg)
    assert images.shape == (8, 3, 16, 16) and targets.max() < 4


def test_image_folder_source(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    cfg = data_cfg(source="imagefolder", root=tmp_path, image_size=16)
    splits = data.load_splits(cfg)
    assert splits.classes == ["cat", "dog"] and len(splits.train) == 8
    images, _ = first_batch(cfg, "val")
    assert images.shape == (8, 3, 16, 16)


@pytest.mark.parametrize("missing", ["root", "val"])
def test_image_folder_missing_parts_are_named(tmp_path: Path, missing: str) -> None:
    write_image_folder(tmp_path, {"train": ["cat"]})
    root = tmp_path / "nowhere" if missing == "root" else tmp_path
    with pytest.raises(DataError, match="does not exist" if missing == "root" else "no val/ folder"):
        data.load_splits(data_cfg(source="imagefolder", root=root))


def test_image_folder_class_mismatch_lists_both_sides(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "eel"]})
    with pytest.raises(DataError, match=r"only in train: \['dog'\]; only in val: \['eel'\]"):
        data.load_splits(data_cfg(source="imagefolder", root=tmp_path))


def test_cifar10_files_load_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path, train_size=40, test_size=10)
    trust_written_cifar_files(monkeypatch, tmp_path)
    cfg = data_cfg(source="cifar10", root=tmp_path, image_size=32)
    splits = data.load_splits(cfg)
    assert len(splits.train) == 40 and len(splits.val) == 10 and len(splits.classes) == 10
    images, targets = first_batch(cfg)
    assert images.shape == (8, 3, 32, 32)


def test_mnist_files_load_as_rgb(tmp_path: Path) -> None:
    write_mnist(tmp_path, train_size=30, test_size=10)
    cfg = data_cfg(source="mnist", root=tmp_path, image_size=28)
    splits = data.load_splits(cfg)
    assert len(splits.train) == 30 and len(splits.classes) == 10
    images, _ = first_batch(cfg)
    assert images.shape == (8, 3, 28, 28), "grayscale digits are converted to 3 channels"


@pytest.mark.parametrize("source", ["cifar10", "mnist"])
def test_absent_torchvision_files_say_how_to_fix(tmp_path: Path, source: str) -> None:
    with pytest.raises(DataError, match="set data.download=true"):
        data.load_splits(data_cfg(source=source, root=tmp_path))


def test_augmentation_is_the_same_with_any_number_of_workers(tmp_path: Path) -> None:
    cfg = data_cfg(cache_dir=tmp_path, synthetic_classes=3, synthetic_train_per_class=8,
                   synthetic_val_per_class=2, image_size=16)
    data.prepare(cfg)
    in_process, _ = first_batch(cfg, workers=0)
    with_workers, _ = first_batch(cfg, workers=2)
    assert torch.equal(in_process, with_workers)


def test_unreadable_image_is_named_or_skipped(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    bad = tmp_path / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    cfg = data_cfg(source="imagefolder", root=tmp_path, image_size=16)
    splits = data.load_splits(cfg)
    index = [path for path, _ in splits.train.samples].index(str(bad))
    strict = data.SeededTransformDataset(splits.train, data.build_transform(cfg, True), seed=0)
    with pytest.raises(DataError, match="broken.png.*on_bad_sample=skip"):
        strict[(0, index)]
    lenient = data.SeededTransformDataset(splits.train, data.build_transform(cfg, True), 0, skip_bad=True)
    images, targets, skipped = data.collate_skipping_bad([lenient[(0, index)], lenient[(0, 0)]])
    assert skipped == 1 and images.shape[0] == 1


def test_seeding_a_sample_in_the_main_process_leaves_its_generator_as_it_was() -> None:
    """With no loader workers the data set runs in the training process, whose generator draws
    dropout masks: a sample's own seeding must not change that stream."""
    dataset = data.SeededTransformDataset([(torch.zeros(3, 4, 4), 0)] * 4, lambda image: image + torch.rand(1), seed=0)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = dataset[(0, 1)][0]
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(dataset[(0, 1)][0], first) and not torch.equal(dataset[(0, 2)][0], first)
