"""Worker-side augmentation (``data.auto_augment``), separate crop sizes and repeated augmentation
(``data.ra_reps``): each policy equals torchvision's own transform bit for bit given the same RNG
state, every draw is a pure function of (seed, epoch, index, repeat) whatever the loader workers,
the copies of a sample differ and land on different ranks, and the epoch's order stays one global
order that a resume at another world size continues exactly once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
import torch
from helpers import small_run
from PIL import Image
from test_tasks import assert_resume_is_bitwise, in_process_worker
from torchvision import datasets, transforms
from torchvision.transforms import AugMix, AutoAugment, AutoAugmentPolicy, RandAugment, TrivialAugmentWide

from trainer import config
from trainer.data import loaders, sources
from trainer.data.erasing import RandomErasing
from trainer.data.loaders import SampleKey
from trainer.data.stages import BatchDraw
from trainer.errors import ConfigError

BILINEAR = transforms.InterpolationMode.BILINEAR
SEED, CROP, SCALE_MIN = 5, 24, 0.3

POLICIES: dict[str, tuple[list[str], Callable[[], torch.nn.Module]]] = {
    "autoaugment": (["auto_augment=autoaugment"],
                    lambda: AutoAugment(AutoAugmentPolicy.IMAGENET, interpolation=BILINEAR)),
    "autoaugment-cifar10": (["auto_augment=autoaugment", "autoaugment_policy=cifar10"],
                            lambda: AutoAugment(AutoAugmentPolicy.CIFAR10, interpolation=BILINEAR)),
    "randaugment": (["auto_augment=randaugment", "randaugment_ops=3", "randaugment_magnitude=14"],
                    lambda: RandAugment(num_ops=3, magnitude=14, interpolation=BILINEAR)),
    "trivialaugment": (["auto_augment=trivialaugment"], lambda: TrivialAugmentWide(interpolation=BILINEAR)),
    "augmix": (["auto_augment=augmix", "augmix_severity=5"], lambda: AugMix(severity=5, interpolation=BILINEAR)),
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Textured JPEGs of two sizes in two classes, train/ and val/ alike."""
    root = tmp_path_factory.mktemp("photos")
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                height, width = (48, 64) if i % 2 else (60, 44)
                shade = torch.linspace(0, 150, width).expand(height, width)[..., None]
                noise = torch.randint(0, 100, (height, width, 3), generator=generator)
                pixels = (shade + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def data_cfg(photos: Path, *overrides: str) -> config.DataConfig:
    """An image folder with random resized crops decoded at full size (torchvision's pixels)."""
    settings = ["source=imagefolder", f"root={photos}", "image_size=32", f"train_crop_size={CROP}",
                "random_resized_crop=true", f"crop_scale_min={SCALE_MIN}", "jpeg_draft=false", *overrides]
    return config.load([], [f"data.{setting}" for setting in settings]).data


def train_set(cfg: config.DataConfig) -> loaders.SeededTransformDataset:
    return loaders.SeededTransformDataset(sources.load_splits(cfg).train, loaders.build_transform(cfg, True), SEED)


@pytest.mark.parametrize("name", POLICIES)
def test_the_policy_equals_torchvisions_own_transform_given_the_same_rng_state(photos: Path, name: str) -> None:
    overrides, policy = POLICIES[name]
    ours = train_set(data_cfg(photos, *overrides))
    plain = train_set(data_cfg(photos))
    reference = transforms.Compose([  # torchvision's ClassificationPresetTrain, PIL backend
        transforms.RandomResizedCrop(CROP, scale=(SCALE_MIN, 1.0), interpolation=BILINEAR, antialias=True),
        transforms.RandomHorizontalFlip(), policy(), transforms.PILToTensor()])
    folder = datasets.ImageFolder(str(photos / "train"))
    keys = [SampleKey(epoch, index, repeat) for epoch in (0, 3) for index in range(len(folder)) for repeat in (0, 2)]
    changed = 0
    for key in keys:
        torch.manual_seed(loaders.sample_seed(SEED, key))
        expected = reference(folder[key.index][0])
        image = ours[key][0]
        assert image.dtype == torch.uint8 and image.shape == (3, CROP, CROP)
        assert torch.equal(image, expected), f"{key} differs from torchvision's {name}"
        changed += not torch.equal(image, plain[key][0])
    assert changed > len(keys) // 2, "the policy should change most crops"


def epoch_batches(cfg: config.DataConfig, workers: int, world: int = 1, rank: int = 0) -> list[loaders.Batch]:
    """Every micro-batch one rank loads in epoch 1 through the real training loader."""
    cfg.num_workers, cfg.persistent_workers = workers, False
    dataset = train_set(cfg)
    sampler = loaders.TrainBatchSampler(len(dataset), world, rank, 3, SEED, cfg.ra_reps)
    sampler.set_position(loaders.Position(epoch=1))
    return list(loaders.build_train_loader(dataset, sampler, cfg, torch.device("cpu"), SEED))


@pytest.mark.parametrize("name", POLICIES)
def test_with_repeats_the_batches_do_not_depend_on_the_loader_workers_and_the_copies_differ(
        photos: Path, name: str) -> None:
    cfg = data_cfg(photos, *POLICIES[name][0], "ra_reps=2")
    in_process, with_workers = epoch_batches(cfg, workers=0), epoch_batches(cfg, workers=2)
    assert len(in_process) == len(with_workers) == 3
    for ours, theirs in zip(in_process, with_workers):
        for field in ("images", "targets", "indices", "repeats"):
            assert torch.equal(getattr(ours, field), getattr(theirs, field)), field
    images = {(index, repeat): image for batch in in_process
              for image, index, repeat in zip(batch.images, batch.indices.tolist(), batch.repeats.tolist())}
    assert sorted(Counter(repeat for _, repeat in images).values()) == [4, 4], "8 samples: 4 of them twice"
    for (index, repeat), image in images.items():
        if repeat == 1:
            assert not torch.equal(image, images[(index, 0)]), f"the copies of sample {index} are alike"


def test_repeat_zero_seeds_as_without_repeats_and_other_copies_differ() -> None:
    dataset = loaders.SeededTransformDataset([(torch.zeros(3), 0)] * 4, lambda image: image + torch.rand(3), seed=1)
    assert torch.equal(dataset[(2, 3)][0], dataset[SampleKey(2, 3, 0)][0])
    copies = [dataset[SampleKey(2, 3, repeat)][0] for repeat in range(3)]
    assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[1], copies[2])
    indices = torch.arange(1000)
    alone = BatchDraw(0, 1, 0, 0, indices).per_sample(0)
    assert torch.equal(BatchDraw(0, 1, 0, 0, indices, torch.zeros(1000, dtype=torch.long)).per_sample(0), alone)
    second = BatchDraw(0, 1, 0, 0, indices, torch.ones(1000, dtype=torch.long)).per_sample(0)
    assert (second != alone).float().mean() > 0.99
    erased = [RandomErasing(1.0)(torch.ones(8, 3, 16, 16), torch.zeros(8), BatchDraw(0, 1, 0, 0, torch.arange(8),
                                                                                    torch.full((8,), r)))[0]
              for r in (0, 1)]
    assert not torch.equal(*erased), "the device's per-sample draws tell the copies apart too"


@pytest.mark.parametrize(("reps", "world", "batch"), [(2, 2, 4), (3, 4, 2), (4, 1, 8)])
def test_the_repeated_order_keeps_the_epoch_length_and_spreads_the_copies_across_ranks(
        reps: int, world: int, batch: int) -> None:
    size = 48  # a whole number of global batches
    samplers = [loaders.TrainBatchSampler(size, world, rank, batch, 7, reps) for rank in range(world)]
    unrepeated = loaders.TrainBatchSampler(size, 1, 0, batch, 7)
    for sampler in (*samplers, unrepeated):
        sampler.set_position(loaders.Position(epoch=2))
    permutation = unrepeated.order()
    expected = [(index, repeat) for index in permutation.tolist() for repeat in range(reps)][:size]
    shards = [[(key.index, key.repeat) for keys in sampler for key in keys] for sampler in samplers]
    assert all(key.epoch == 2 for keys in samplers[0] for key in keys)
    assert sorted(sum(shards, [])) == sorted(expected)  # the epoch's length: size / reps samples, reps times
    assert [expected[p] for p in range(0, size, world)] == shards[0]  # rank r takes every world-th position
    if reps <= world:
        for shard in shards:
            assert len({index for index, _ in shard}) == len(shard), "two copies of a sample on one rank"


@pytest.mark.parametrize(("before", "after"), [((2, 4), (3, 5)), ((3, 2), (1, 7))])
def test_a_resume_with_repeats_at_another_world_or_batch_serves_the_rest_of_the_order_once(
        before: tuple[int, int], after: tuple[int, int]) -> None:
    size, reps = 50, 2

    def keys(world: int, batch: int, position: loaders.Position, steps: int | None = None) -> list[tuple[int, int]]:
        served = []
        for rank in range(world):
            sampler = loaders.TrainBatchSampler(size, world, rank, batch, 7, reps)
            sampler.set_position(position)
            served += [(key.index, key.repeat) for keys in list(sampler)[:steps] for key in keys]
        return served

    first = keys(*before, loaders.Position(epoch=1), steps=3)
    rest = keys(*after, loaders.Position(epoch=1, consumed=len(first)))
    whole = keys(1, 1, loaders.Position(epoch=1))
    assert Counter(first + rest) == Counter(whole) and len(set(whole)) == size


def test_train_and_validation_sizes_follow_their_keys_and_default_to_image_size(photos: Path) -> None:
    cfg = data_cfg(photos, "train_crop_size=20", "val_resize_size=30", "val_crop_size=24")
    splits = sources.load_splits(cfg)
    assert loaders.build_transform(cfg, True)(splits.train[0][0]).shape == (3, 20, 20)
    reference = transforms.Compose([transforms.Resize(30, antialias=True), transforms.CenterCrop(24),
                                    transforms.PILToTensor()])
    folder = datasets.ImageFolder(str(photos / "val"))
    ours = loaders.build_transform(cfg, False)
    for index in range(len(folder)):
        assert torch.equal(ours(splits.val[index][0]), reference(folder[index][0]))
    defaults = config.load([], ["data.image_size=32", "data.val_crop_fraction=0.875"]).data
    assert (loaders.train_crop_size(defaults), loaders.val_sizes(defaults)) == (32, (37, 32))
    assert loaders.val_sizes(config.load([], ["data.val_crop_size=24", "data.val_crop_fraction=0.75"]).data) == (32, 24)


@pytest.mark.parametrize(("override", "message"), [
    ("data.auto_augment=randaugmnet", "did you mean 'randaugment'"),
    ("data.randaugment_magnitude=31", "data.randaugment_magnitude: must be in [0, 30]"),
    ("data.augmix_severity=0", "data.augmix_severity: must be in [1, 10]"),
    ("data.ra_reps=0", "data.ra_reps: must be > 0"),
    ("data.val_crop_size=-1", "data.val_crop_size: must be >= 0"),
])
def test_bad_augmentation_settings_are_refused_in_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config.load([], [override])
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_run_with_repeats_a_policy_and_erasing_resumes_bitwise(tmp_path: Path) -> None:
    args = ["model.name=linear", "train.epochs=2", "log.pictures=false", "data.ra_reps=3",
            "data.auto_augment=trivialaugment", "data.random_erase=0.5"]
    through, _ = assert_resume_is_bitwise(lambda name: in_process_worker(small_run(tmp_path, *args,
                                                                                   f"log.name={name}")))
    assert through.inputs.sampler.repeats == 3
