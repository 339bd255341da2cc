"""``data.decode=gpu`` with the device = CPU: the loader workers leave JPEGs encoded, the main
process decodes them in batches (libjpeg-turbo here, nvjpeg on CUDA: tests/test_gpu.py).

Against the CPU path (``data.decode=cpu``, ``data.jpeg_draft=false``): the same crop boxes and
flips from each sample's seed, pixels within 1, the same augmentation policy draws; PNG, CMYK and
grayscale files fall back to the workers and are counted; a file no decoder reads is an unreadable
sample; a run trains, resumes bitwise mid-epoch, with 0 or 2 loader workers alike.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import small_run
from PIL import Image
from torchvision import transforms
from torchvision.transforms import autoaugment

from trainer import config
from trainer.data import image_index, loaders, sources
from trainer.data.device_decode import DeviceDecoder, decodes_on_device
from trainer.data.encoded import Encoded, EncodedImages
from trainer.data.stages import DecodeAhead
from trainer.errors import ConfigError, DataError
from trainer.parallel import distributed
from trainer.parallel.signals import StopRequest
from trainer.train.worker import Worker

CPU = torch.device("cpu")
CLASSES = ("ant", "bee", "cat")
FALLBACKS = ("drawing.png", "print.jpg", "gray.jpg")
"""Files the device decoder does not take: a PNG, a CMYK JPEG, a grayscale JPEG (in class ant)."""


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random picture (JPEG-like content: blocks resized up)."""
    coarse = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder: 30 training and 9 validation JPEGs of many sizes, and the fallback files."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for split, count in (("train", 30), ("val", 9)):
        for i in range(count):
            folder = root / split / CLASSES[i % 3]
            folder.mkdir(parents=True, exist_ok=True)
            width, height = (int(v) for v in rng.integers(24, 90, 2))
            photo(rng, width, height).save(folder / f"{i:03d}.jpg", quality=int(rng.integers(60, 96)),
                                           subsampling=int(rng.integers(0, 3)))
    ant = root / "train" / "ant"
    photo(rng, 50, 40).save(ant / FALLBACKS[0])
    photo(rng, 44, 60).convert("CMYK").save(ant / FALLBACKS[1], quality=90)
    photo(rng, 70, 35).convert("L").save(ant / FALLBACKS[2], quality=90)
    return root


def data_config(root: Path, *extra: str) -> config.DataConfig:
    return config.load([], ["data.source=imagefolder", f"data.root={root}", "data.image_size=24",
                            "data.random_resized_crop=true", "data.crop_scale_min=0.2", "data.jpeg_draft=false",
                            "data.val_crop_fraction=0.75", *extra]).data


def both_ways(root: Path, train: bool, *extra: str) -> tuple[Any, Any]:
    cfg = data_config(root, *extra)
    splits = sources.load_splits(cfg)
    split = splits.train if train else splits.val
    return (loaders.SeededTransformDataset(split, loaders.build_transform(cfg, train), seed=7),
            loaders.SeededTransformDataset(split, loaders.build_transform(cfg, train, device_decode=True), seed=7))


def keys(dataset: Any, epochs: int = 2) -> list[loaders.SampleKey]:
    return [loaders.SampleKey(epoch, index) for epoch in range(epochs) for index in range(len(dataset))]


def test_boxes_and_flips_are_the_worker_paths_draws(root: Path) -> None:
    """Each sample's box and flip are torchvision's RandomResizedCrop + RandomHorizontalFlip draws
    from the sample's seed on the full-size image: what the CPU path crops."""
    _, on_device = both_ways(root, True)
    encoded = 0
    for key in keys(on_device):
        sample = on_device[key][0]
        if not isinstance(sample, Encoded):
            assert Path(on_device.base.sample_path(key.index)).name in FALLBACKS
            continue
        encoded += 1
        torch.manual_seed(loaders.sample_seed(7, key))
        with Image.open(on_device.base.sample_path(key.index)) as image:
            box = transforms.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3])
        flip = bool(torch.rand(1) < 0.5)
        assert (sample.plan.box, sample.plan.flip) == (box, flip)
        assert sample.plan.size == (24, 24) and sample.plan.crop == (0, 0, 24, 24)
    assert encoded == 2 * 30


@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
def test_pixels_within_one_of_the_worker_path_and_fallbacks_counted(root: Path, train: bool) -> None:
    on_cpu, on_device = both_ways(root, train)
    decoder = DeviceDecoder(CPU, torch.channels_last)
    sample_keys = keys(on_cpu, 1)
    expected = loaders.collate_skipping_bad([on_cpu[key] for key in sample_keys])
    loaded = loaders.collate_skipping_bad([on_device[key] for key in sample_keys])
    assert isinstance(loaded.images, EncodedImages) and len(loaded.images) == len(sample_keys)
    decoded = decoder(loaded)
    assert decoded.images.dtype == torch.uint8 and decoded.images.is_contiguous(memory_format=torch.channels_last)
    difference = (decoded.images.int() - expected.images.int()).abs()
    assert difference.max() <= 1 and difference.float().mean() < 0.05
    assert torch.equal(decoded.indices, expected.indices) and torch.equal(decoded.targets, expected.targets)
    assert (decoder.samples, decoder.cpu_decoded) == (len(sample_keys), 3 if train else 0)


def test_a_batch_of_fallbacks_alone_is_counted(root: Path) -> None:
    _, on_device = both_ways(root, True)
    fallbacks = [key for key in keys(on_device, 1) if Path(on_device.base.sample_path(key.index)).name in FALLBACKS]
    batch = loaders.collate_skipping_bad([on_device[key] for key in fallbacks])
    decoder = DeviceDecoder(CPU)
    assert decoder(batch) is batch and isinstance(batch.images, torch.Tensor)
    assert (decoder.samples, decoder.cpu_decoded) == (3, 3)


def test_a_policy_on_the_device_makes_the_worker_paths_draws(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TrivialAugmentWide on the device continues each sample's RNG stream where the worker left it:
    the same operation and magnitude per sample as on the CPU path."""
    applied: list[tuple[str, float]] = []
    apply_op = autoaugment._apply_op

    def recording(image: Any, op: str, magnitude: float, *args: Any, **kwargs: Any) -> Any:
        applied.append((op, round(magnitude, 6)))
        return apply_op(image, op, magnitude, *args, **kwargs)

    monkeypatch.setattr(autoaugment, "_apply_op", recording)
    on_cpu, on_device = both_ways(root, True, "data.auto_augment=trivialaugment")
    sample_keys = [key for key in keys(on_cpu, 1) if Path(on_cpu.base.sample_path(key.index)).name not in FALLBACKS]
    loaders.collate_skipping_bad([on_cpu[key] for key in sample_keys])
    worker_path, applied[:] = list(applied), []
    loaded = loaders.collate_skipping_bad([on_device[key] for key in sample_keys])
    assert applied == []  # nothing augmented in the worker
    state = torch.get_rng_state()
    DeviceDecoder(CPU, policy=autoaugment.TrivialAugmentWide())(loaded)
    assert applied == worker_path and len(set(applied)) > 5
    assert torch.equal(torch.get_rng_state(), state)  # the main process's stream is left as it was


def test_a_file_no_decoder_reads_is_an_unreadable_sample(root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "train" / "ant"
    folder.mkdir(parents=True)
    good = (root / "train" / "ant" / "000.jpg").read_bytes()
    (folder / "a.jpg").write_bytes(good)
    (folder / "b.jpg").write_bytes(good[:len(good) // 2])  # the header reads, the pixels do not
    split = image_index.load_split(tmp_path / "train", tmp_path / "cache")
    cfg = data_config(root)
    for skip in (False, True):
        dataset = loaders.SeededTransformDataset(split, loaders.build_transform(cfg, True, True), 0, skip)
        batch = loaders.collate_skipping_bad([dataset[(0, 0)], dataset[(0, 1)]])
        decoder = DeviceDecoder(CPU)
        if not skip:
            with pytest.raises(DataError, match=r"cannot read sample '.*b\.jpg'.*data.on_bad_sample=skip"):
                decoder(batch, dataset.describe, skip)
            continue
        decoded = decoder(batch, dataset.describe, skip)
        assert decoded.skipped == 1 and decoded.indices.tolist() == [0] and decoded.images.shape == (1, 3, 24, 24)
        everything_bad = decoder(loaders.collate_skipping_bad([dataset[(0, 1)]]), dataset.describe, skip)
        assert everything_bad.skipped == 1 and everything_bad.targets.numel() == 0


def test_decode_ahead_serves_every_batch_in_order(root: Path) -> None:
    _, on_device = both_ways(root, True)
    batches = [loaders.collate_skipping_bad([on_device[(0, i)] for i in range(start, start + 4)])
               for start in range(0, 12, 4)]
    feed = DecodeAhead(batches, DeviceDecoder(CPU))
    served = list(feed)
    assert [b.indices.tolist() for b in served] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert all(isinstance(b.images, torch.Tensor) for b in served) and feed.decoding > 0
    assert list(DecodeAhead(batches, None)) == batches  # no decoder: the loader's batches as they are


def test_decode_choice_and_refusal(root: Path) -> None:
    assert decodes_on_device(data_config(root, "data.decode=gpu"), CPU)  # gpu: the run's device, whatever it is
    assert not decodes_on_device(data_config(root, "data.decode=auto"), CPU)  # auto: CUDA only
    assert not decodes_on_device(data_config(root), CPU)
    with pytest.raises(ConfigError, match="data.decode=gpu: data.auto_augment=augmix"):
        data_config(root, "data.decode=gpu", "data.auto_augment=augmix")


# ----------------------------------------------------------------------------- training runs
def worker(tmp: Path, root: Path, name: str, *extra: str) -> Worker:
    cfg = config.load([], small_run(tmp, f"log.name={name}", "data.source=imagefolder", f"data.root={root}",
                                    "data.decode=gpu", "data.random_resized_crop=true", "data.jpeg_draft=false",
                                    "data.auto_augment=trivialaugment", "model.channels_last=true",
                                    "train.epochs=2", "ckpt.every_steps=0", "log.pictures=false", *extra,
                                    image_size=24, batch_size=6))
    return Worker(cfg, distributed.setup("cpu"), cfg.run_dir, StopRequest())


@pytest.fixture(scope="module")
def uninterrupted(root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Worker]:
    """Two epochs with data.decode=gpu on the CPU, 2 loader workers."""
    tmp = tmp_path_factory.mktemp("runs")
    run = worker(tmp, root, "whole", "data.num_workers=2")
    assert run.inputs.device_decode and run.fit() == 0
    return tmp, run


def test_a_run_decodes_on_the_device_and_validates(uninterrupted: tuple[Path, Worker],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    _, run = uninterrupted
    history = run.record.history
    assert len(history) == 2 and all(np.isfinite(e["train/loss"]) and 0 <= e["val/top1"] <= 1 for e in history)
    assert all(e["train/decode_time_s"] > 0 for e in history)
    assert run.stages.decoder is not None and run.stages.decoder.cpu_decoded > 0  # the fallback files


def test_stopped_mid_epoch_resumes_bitwise_with_any_worker_count(root: Path,
                                                                 uninterrupted: tuple[Path, Worker]) -> None:
    tmp, whole = uninterrupted
    stopped = worker(tmp, root, "stopped")
    original = stopped.step.micro_batch
    steps: list[int] = []

    def stop_at_the_eighth(*args: Any, **kwargs: Any) -> Any:
        steps.append(1)
        if len(steps) == 8:  # epoch 2, its third step (6 batches an epoch)
            stopped.stop.received.append("SIGTERM")
        return original(*args, **kwargs)

    stopped.step.micro_batch = stop_at_the_eighth  # type: ignore[method-assign]
    assert stopped.fit() != 0
    state = torch.load(stopped.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["position"]["epoch"] == 1 and state["position"]["consumed"] > 0
    resumed = worker(tmp, root, "stopped")
    resumed.resume(resumed.run_dir / "checkpoints" / "last.pt")
    assert resumed.fit() == 0
    a = torch.load(whole.run_dir / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(resumed.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), f"weights differ at {key}"
    timing = ("images_per_s", "data_wait", "time_s", "peak_mem_mb", "tflops", "mfu")
    assert [{k: v for k, v in e.items() if not k.endswith(timing)} for e in a["history"]] == \
           [{k: v for k, v in e.items() if not k.endswith(timing)} for e in b["history"]]


def test_bytes_of_an_image_opened_from_memory_are_read(root: Path) -> None:
    """A source that opens JPEGs from bytes in memory (a shard) sends them to the device too."""
    data = (root / "val" / "ant" / "000.jpg").read_bytes()
    cfg = data_config(root)
    transform = loaders.build_transform(cfg, False, device_decode=True)
    sample = transform(Image.open(io.BytesIO(data)))
    assert isinstance(sample, Encoded) and sample.data.numpy().tobytes() == data
