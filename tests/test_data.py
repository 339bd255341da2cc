"""Each data source through the real loaders: synthetic, ImageFolder, CIFAR-10 and MNIST files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import small_run
from PIL import Image
from torchvision import datasets, transforms
from torchvision_files import trust_written_cifar_files, write_cifar10, write_mnist

from trainer import config
from trainer.data import decode, loaders, sources
from trainer.data.stages import Normalize
from trainer.errors import EXIT_OK, EXIT_STOPPED, DataError
from trainer.parallel import distributed
from trainer.parallel.signals import StopRequest
from trainer.train.worker import Worker


def data_cfg(**overrides: object) -> config.DataConfig:
    cfg = config.load([], [f"data.{k}={v}" for k, v in overrides.items()])
    return cfg.data


def first_batch(cfg: config.DataConfig, split: str = "train", workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    splits = sources.load_splits(cfg)
    base = splits.train if split == "train" else splits.val
    dataset = loaders.SeededTransformDataset(base, loaders.build_transform(cfg, split == "train"), seed=0)
    batches = loaders.TrainBatchSampler(len(dataset), 1, 0, batch_size=8, seed=0)
    cfg.num_workers = workers
    loader = loaders.build_train_loader(dataset, batches, cfg, torch.device("cpu"), seed=0)
    images, targets, skipped, *_ = next(iter(loader))
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
    sources.prepare(cfg)
    splits = sources.load_splits(cfg)
    assert len(splits.train) == 24 and len(splits.val) == 12
    assert splits.classes == sorted(splits.classes) and len(splits.classes) == 4
    images, targets = first_batch(cfg)
    assert images.shape == (8, 3, 16, 16) and targets.max() < 4


def test_image_folder_source(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    cfg = data_cfg(source="imagefolder", root=tmp_path, image_size=16)
    splits = sources.load_splits(cfg)
    assert splits.classes == ["cat", "dog"] and len(splits.train) == 8
    images, _ = first_batch(cfg, "val")
    assert images.shape == (8, 3, 16, 16)


@pytest.mark.parametrize("missing", ["root", "val"])
def test_image_folder_missing_parts_are_named(tmp_path: Path, missing: str) -> None:
    write_image_folder(tmp_path, {"train": ["cat"]})
    root = tmp_path / "nowhere" if missing == "root" else tmp_path
    with pytest.raises(DataError, match="does not exist" if missing == "root" else "no val/ folder"):
        sources.load_splits(data_cfg(source="imagefolder", root=root))


def test_image_folder_class_mismatch_lists_both_sides(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "eel"]})
    with pytest.raises(DataError, match=r"only in train: \['dog'\]; only in val: \['eel'\]"):
        sources.load_splits(data_cfg(source="imagefolder", root=tmp_path))


def test_cifar10_files_load_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path, train_size=40, test_size=10)
    trust_written_cifar_files(monkeypatch, tmp_path)
    cfg = data_cfg(source="cifar10", root=tmp_path, image_size=32)
    splits = sources.load_splits(cfg)
    assert len(splits.train) == 40 and len(splits.val) == 10 and len(splits.classes) == 10
    images, targets = first_batch(cfg)
    assert images.shape == (8, 3, 32, 32)


def test_mnist_files_load_as_rgb(tmp_path: Path) -> None:
    write_mnist(tmp_path, train_size=30, test_size=10)
    cfg = data_cfg(source="mnist", root=tmp_path, image_size=28)
    splits = sources.load_splits(cfg)
    assert len(splits.train) == 30 and len(splits.classes) == 10
    images, _ = first_batch(cfg)
    assert images.shape == (8, 3, 28, 28), "grayscale digits are converted to 3 channels"


@pytest.mark.parametrize("source", ["cifar10", "mnist"])
def test_absent_torchvision_files_say_how_to_fix(tmp_path: Path, source: str) -> None:
    with pytest.raises(DataError, match="set data.download=true"):
        sources.load_splits(data_cfg(source=source, root=tmp_path))


def test_augmentation_is_the_same_with_any_number_of_workers(tmp_path: Path) -> None:
    cfg = data_cfg(cache_dir=tmp_path, synthetic_classes=3, synthetic_train_per_class=8,
                   synthetic_val_per_class=2, image_size=16)
    sources.prepare(cfg)
    in_process, _ = first_batch(cfg, workers=0)
    with_workers, _ = first_batch(cfg, workers=2)
    assert torch.equal(in_process, with_workers)


def test_unreadable_image_is_named_or_skipped(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    bad = tmp_path / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    cfg = data_cfg(source="imagefolder", root=tmp_path, image_size=16)
    splits = sources.load_splits(cfg)
    index = [splits.train.sample_path(i) for i in range(len(splits.train))].index(str(bad))
    strict = loaders.SeededTransformDataset(splits.train, loaders.build_transform(cfg, True), seed=0)
    with pytest.raises(DataError, match="broken.png.*on_bad_sample=skip"):
        strict[(0, index)]
    lenient = loaders.SeededTransformDataset(splits.train, loaders.build_transform(cfg, True), 0, skip_bad=True)
    images, targets, skipped, *_ = loaders.collate_skipping_bad([lenient[(0, index)], lenient[(0, 0)]])
    assert skipped == 1 and images.shape[0] == 1


# ----------------------------------------------------------------------------- uint8 workers, JPEG decoding
def write_photo_folder(root: Path, width: int = 200, height: int = 150, per_class: int = 3) -> None:
    """Textured JPEGs (one grayscale) and a PNG in two classes, train/ and val/ alike."""
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                shade = torch.linspace(0, 160, width).expand(height, width)[..., None]
                noise = torch.randint(0, 90, (height, width, 3), generator=gen)
                pixels = (shade + noise).clamp(0, 255).to(torch.uint8).numpy()
                image = Image.fromarray(pixels)
                if i == 2:
                    image.save(folder / f"{i}.png")
                else:
                    (image.convert("L") if label == "b" and i == 1 else image).save(folder / f"{i}.jpg", quality=90)


@pytest.mark.parametrize("split", ["train", "val"])
def test_uint8_loader_output_normalised_on_the_device_equals_the_float_pipeline(tmp_path: Path, split: str) -> None:
    """The uint8 path (jpeg_draft off: the same decode) + Normalize equals ToTensor + Normalize to 1e-6."""
    write_photo_folder(tmp_path)
    cfg = data_cfg(source="imagefolder", root=tmp_path, image_size=40, random_resized_crop=True, crop_scale_min=0.3,
                   val_crop_fraction=0.875, jpeg_draft=False, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    train = split == "train"
    steps: list = [transforms.RandomResizedCrop(40, scale=(0.3, 1.0), antialias=True), transforms.RandomHorizontalFlip()]
    if not train:
        steps = [transforms.Resize(round(40 / 0.875), antialias=True), transforms.CenterCrop(40)]
    tutorial = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(cfg.mean, cfg.std)])
    expected_set = loaders.SeededTransformDataset(datasets.ImageFolder(str(tmp_path / split)), tutorial, seed=3)
    splits = sources.load_splits(cfg)
    ours = loaders.SeededTransformDataset(splits.train if train else splits.val, loaders.build_transform(cfg, train), seed=3)
    keys = [(epoch, index) for epoch in (0, 1) for index in range(len(ours))]
    loaded = torch.stack([ours[key][0] for key in keys])
    expected = torch.stack([expected_set[key][0] for key in keys])
    assert loaded.dtype == torch.uint8 and loaded.shape == expected.shape == (len(keys), 3, 40, 40)
    torch.testing.assert_close(Normalize(cfg.mean, cfg.std, torch.device("cpu"))(loaded), expected, rtol=0, atol=1e-6)


def test_reduced_size_jpeg_decoding_is_a_pure_function_of_seed_epoch_and_index(tmp_path: Path) -> None:
    write_photo_folder(tmp_path, width=256, height=192)
    settings = dict(source="imagefolder", root=tmp_path, image_size=24, random_resized_crop=True, crop_scale_min=0.5)
    cfg = data_cfg(**settings)
    in_process, _ = first_batch(cfg, workers=0)
    with_workers, _ = first_batch(cfg, workers=2)
    assert in_process.dtype == torch.uint8 and torch.equal(in_process, with_workers)
    full_size, _ = first_batch(data_cfg(**settings, jpeg_draft=False))
    difference = (in_process.float() - full_size.float()).abs().mean(dim=(1, 2, 3))
    assert difference.max() < 12, "the same crop, resampled from a smaller decode"
    assert (difference > 0).any(), "some crops were decoded at a reduced size"
    assert [decode.draft_scale(h, w, 24) for h, w in ((200, 200), (100, 60), (47, 100))] == [8, 2, 1]


def test_normalize_converts_uint8_keeps_channels_last_and_passes_float_batches() -> None:
    normalize = Normalize([0.5] * 3, [0.25] * 3, torch.device("cpu"))
    pixels = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    images = normalize(pixels.contiguous(memory_format=torch.channels_last))
    assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(images[0, :, 0, 0], torch.tensor([-2.0, 128 / 255 * 4 - 2, 2.0]))
    user_floats = torch.randn(2, 3, 4, 4)
    assert normalize(user_floats) is user_floats, "a user's float tensors are already normalised"
    assert (normalize.to_pixels(pixels) == pixels.permute(0, 2, 3, 1).numpy()).all()


def test_truncated_jpeg_is_named_or_skipped(tmp_path: Path) -> None:
    """The pixels of a lazily opened file decode in the transform: its errors are the sample's too."""
    write_photo_folder(tmp_path)
    bad = tmp_path / "train" / "a" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:2000])
    cfg = data_cfg(source="imagefolder", root=tmp_path, image_size=16)
    splits = sources.load_splits(cfg)
    index = [splits.train.sample_path(i) for i in range(len(splits.train))].index(str(bad))
    with pytest.raises(DataError, match="0.jpg.*truncated.*on_bad_sample=skip"):
        loaders.SeededTransformDataset(splits.train, loaders.build_transform(cfg, True), seed=0)[(0, index)]
    lenient = loaders.SeededTransformDataset(splits.train, loaders.build_transform(cfg, True), 0, skip_bad=True)
    assert lenient[(0, index)] is None


def test_a_mid_epoch_resume_on_jpeg_files_with_loader_workers_is_bitwise_identical(tmp_path: Path) -> None:
    """uint8 workers, reduced-size decoding and normalisation on the device: stopped mid-epoch with
    no loader workers and resumed with 2, a run ends with the weights of one that ran through with 1."""
    write_photo_folder(tmp_path / "photos", width=120, height=90, per_class=6)
    common = ["data.source=imagefolder", f"data.root={tmp_path / 'photos'}", "model.name=linear", "train.epochs=2",
              "data.random_resized_crop=true", "data.crop_scale_min=0.3", "log.pictures=false",
              "data.persistent_workers=false"]  # no worker processes outlive a failing assertion

    def worker(name: str, workers: int) -> Worker:
        cfg = config.load([], small_run(tmp_path, *common, f"log.name={name}", f"data.num_workers={workers}",
                                        batch_size=2))
        return Worker(cfg, distributed.setup("cpu"), cfg.run_dir, StopRequest())

    through = worker("through", 1)
    assert through.fit() == EXIT_OK
    stopped = worker("stopped", 0)
    criterion, calls = stopped.task.loss, []

    def stop_at_the_second_step(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            stopped.stop.received.append("SIGTERM")
        return criterion(logits, targets)

    stopped.task.loss = stop_at_the_second_step  # type: ignore[method-assign]
    assert stopped.fit() == EXIT_STOPPED and 0 < stopped.position.consumed < len(stopped.inputs.sampler.order())
    resumed = worker("stopped", 2)
    resumed.resume(resumed.run_dir / "checkpoints" / "last.pt")
    assert resumed.fit() == EXIT_OK and resumed.record.global_step == through.record.global_step
    for key, value in through.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[key], value), key
def test_seeding_a_sample_in_the_main_process_leaves_its_generator_as_it_was() -> None:
    """With no loader workers the data set runs in the training process, whose generator draws
    dropout masks: a sample's own seeding must not change that stream."""
    dataset = loaders.SeededTransformDataset([(torch.zeros(3, 4, 4), 0)] * 4, lambda image: image + torch.rand(1), seed=0)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = dataset[(0, 1)][0]
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(dataset[(0, 1)][0], first) and not torch.equal(dataset[(0, 2)][0], first)
