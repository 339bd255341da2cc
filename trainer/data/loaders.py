"""Transforms, samplers and loaders over the sets :mod:`trainer.data.sources` opens.

Augmentation randomness is a pure function of (seed, epoch, sample index, repeat): each sample
seeds its own transform (repeat tells apart the copies of a sample that repeated augmentation puts
in one epoch; 0 without it). The batches a rank sees therefore do not depend on the number of
DataLoader workers, and a run resumed in the middle of an epoch sees exactly the samples it would
have seen.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info
from torchvision import transforms

from trainer.config import DataConfig
from trainer.data import decode, encoded, policies, workers as worker_plans
from trainer.data.stages import Batch
from trainer.errors import DataError, UserError
from trainer.parallel import hangs

log = logging.getLogger(__name__)


def train_crop_size(cfg: DataConfig) -> int:
    """The side of the training crops: ``data.train_crop_size``, else ``data.image_size``."""
    return cfg.train_crop_size or cfg.image_size


def val_sizes(cfg: DataConfig) -> tuple[int, int]:
    """(resize, crop) of the evaluation transform: the shorter side is resized to the first, then
    the centre is cropped to the second (``data.val_resize_size``, ``data.val_crop_size``; by default
    the crop is ``data.image_size`` and the resize the crop over ``data.val_crop_fraction``)."""
    crop = cfg.val_crop_size or cfg.image_size
    return cfg.val_resize_size or round(crop / cfg.val_crop_fraction), crop


def build_transform(cfg: DataConfig, train: bool, device_decode: bool = False) -> Callable[[Any], Any]:
    """Train: random resized crop and flip (each optional), then the augmentation policy
    (``data.auto_augment``); val: resize and centre crop.

    The result is a uint8 (3, H, W) tensor: :class:`trainer.data.stages.Normalize` makes it float
    and normalises it on the device. With ``device_decode`` (``data.decode=gpu``) a JPEG the device
    decoder takes leaves as its bytes and geometry instead (:class:`encoded.EncodedTransform`).
    """
    steps: list[Callable] = []
    geometry: Callable
    policy = policies.build_policy(cfg) if train else None
    if train:
        size = train_crop_size(cfg)
        if cfg.random_resized_crop:
            crop = decode.ResizedCrop(size, (cfg.crop_scale_min, 1.0), cfg.jpeg_draft)
            steps.append(crop)
            geometry = encoded.RandomBox(crop, cfg.hflip)
        else:
            resize = round(size / cfg.val_crop_fraction)
            steps += [decode.to_rgb, transforms.Resize(resize, antialias=True), transforms.CenterCrop(size)]
            geometry = encoded.ResizeCentre(resize, size, cfg.hflip)
        if cfg.hflip:
            steps.append(transforms.RandomHorizontalFlip())
        if policy is not None:
            steps.append(policy)
    else:
        resize, crop_size = val_sizes(cfg)
        steps += [decode.to_rgb, transforms.Resize(resize, antialias=True), transforms.CenterCrop(crop_size)]
        geometry = encoded.ResizeCentre(resize, crop_size, False)
    steps.append(decode.to_uint8_tensor)
    on_cpu = transforms.Compose(steps)
    if device_decode:
        return TensorsPassThrough(encoded.EncodedTransform(geometry, on_cpu, keep_rng=policy is not None))
    return TensorsPassThrough(on_cpu)


class TensorsPassThrough:
    """Apply ``transform`` to images; a tensor item (from the user's own data set) passes as is."""

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, item: Any) -> Any:
        return item if isinstance(item, torch.Tensor) else self.transform(item)


class SampleKey(NamedTuple):
    """What the samplers yield and :class:`SeededTransformDataset` reads (a plain (epoch, index)
    tuple reads as repeat 0)."""

    epoch: int
    index: int
    repeat: int = 0
    """Which copy of the sample in the epoch, with repeated augmentation (``data.ra_reps``)."""


def sample_seed(seed: int, key: SampleKey) -> int:
    """The torch seed of one sample's transform; repeat 0 seeds as before repeats existed."""
    words = (seed, key.epoch, key.index) + ((key.repeat,) if key.repeat else ())
    return hash(words) & 0x7FFF_FFFF_FFFF_FFFF


class SeededTransformDataset(Dataset):
    """Applies ``transform`` to ``base[index]`` with the torch RNG seeded from (seed, epoch, index,
    repeat).

    Unreadable samples raise :class:`DataError` naming the file, or, with ``skip_bad``, become
    ``None`` so :func:`collate_skipping_bad` drops and counts them.
    """

    def __init__(self, base: Dataset, transform: Callable, seed: int, skip_bad: bool = False) -> None:
        self.base, self.transform, self.seed, self.skip_bad = base, transform, seed, skip_bad

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey | tuple[int, int]) -> tuple[torch.Tensor, Any, int, int] | None:
        """(image, target, index, repeat), or None for an unreadable sample in skip mode."""
        key = SampleKey(*key)
        index = key.index
        # Seeded before reading too: a user's data set may draw in __getitem__. A loader worker's
        # generator serves this data set alone, so only the main process (no workers) needs its
        # state back; saving it costs about as much as the seeding.
        state = torch.get_rng_state() if get_worker_info() is None else None
        torch.default_generator.manual_seed(sample_seed(self.seed, key))
        try:
            try:
                image, target = self.base[index]
            except UserError:  # the data set's own verdict (a damaged prepared shard), not one bad sample
                raise
            except Exception as exc:  # any decoder error: PIL.UnidentifiedImageError, OSError, SyntaxError...
                return self._unreadable(index, exc)
            try:
                return self.transform(image), target, index, key.repeat
            except (OSError, SyntaxError) as exc:  # a lazily opened file's pixels decode here (truncated data)
                return self._unreadable(index, exc)
        finally:
            if state is not None:
                torch.set_rng_state(state)

    def _unreadable(self, index: int, exc: Exception) -> None:
        """``None`` in skip mode; else the error naming the sample."""
        if self.skip_bad:
            return None
        raise DataError(f"cannot read sample {self.describe(index)}: {exc}; "
                        "fix or remove it, or set data.on_bad_sample=skip") from None

    def describe(self, index: int) -> str:
        """The sample as an error names it: its file, else its index."""
        if hasattr(self.base, "sample_path"):
            return f"'{self.base.sample_path(index)}'"
        samples: Sequence | None = getattr(self.base, "samples", None)  # e.g. the user's own ImageFolder
        return f"'{samples[index][0]}'" if samples else f"#{index}"


def collate_skipping_bad(batch: list[Any]) -> Batch:
    """Stack the readable samples; also count those dropped as unreadable."""
    good = [sample for sample in batch if sample is not None]
    if not good:
        nothing = torch.empty(0, dtype=torch.long)
        return Batch(torch.empty(0), nothing, len(batch), nothing, nothing)
    if any(isinstance(sample[0], encoded.Encoded) for sample in good):
        return encoded.collate_encoded(good, len(batch) - len(good))
    images, targets, indices, repeats = default_collate(good)
    return Batch(images, targets, len(batch) - len(good), indices, repeats)


@dataclass
class Position:
    """Where training is: the epoch, and how many samples of that epoch's global order are consumed.

    Global, not per rank: a resume at another world size or batch size continues from here.
    """

    epoch: int = 0
    consumed: int = 0

    def epochs_done(self, size: int) -> float:
        """Training progress in (fractional) epochs, the learning-rate schedule's clock."""
        return self.epoch + self.consumed / size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


class TrainBatchSampler(Sampler[list[SampleKey]]):
    """This rank's micro-batches of one epoch's global order, from a global position on.

    The epoch's order is DistributedSampler's permutation (``randperm`` seeded with seed + epoch);
    with repeated augmentation (``repeats`` > 1) each index of it is repeated in a row, the copies
    numbered 0, 1..., and the order cut to the data set's size, as torchvision's ``RASampler`` does:
    the copies of a sample sit on neighbouring positions, which the stride below gives to different
    ranks, and an epoch still has the data set's length (about size / repeats distinct samples).
    Global micro-batch j covers positions [start + j*G, start + (j+1)*G) of it (G = batch x world)
    and rank r takes every world-th position from start + r: DistributedSampler's strided shards,
    so k micro-batches on W ranks consume exactly a prefix of the order, whatever W and the batch.
    The rest of the epoch that does not fill a global batch is served too (see
    :meth:`global_batches`), split as evenly as the stride does; only a rest smaller than the
    world size, where some rank would get nothing, is left out.
    """

    def __init__(self, size: int, world_size: int, rank: int, batch_size: int, seed: int, repeats: int = 1) -> None:
        self.size, self.world_size, self.rank = size, world_size, rank
        self.batch_size, self.seed, self.repeats = batch_size, seed, repeats
        self.position = Position()

    def set_position(self, position: Position) -> None:
        self.position = Position(position.epoch, position.consumed)

    def global_batches(self) -> list[int]:
        """Sizes of the global micro-batches from the position to the end of the epoch.

        A remainder shares the last full batch's samples: two batches of about (G + rest) / 2,
        never a tiny last step whose few samples would also set BatchNorm's running statistics
        just before validation, and never more than G.
        """
        full_size = self.batch_size * self.world_size
        full, rest = divmod(max(0, self.size - self.position.consumed), full_size)
        if rest == 0:
            return [full_size] * full
        if full > 0 and (full_size + rest) // 2 >= self.world_size:
            return [full_size] * (full - 1) + [(full_size + rest + 1) // 2, (full_size + rest) // 2]
        return [full_size] * full + ([rest] if rest >= self.world_size else [])

    def order(self) -> torch.Tensor:
        """The sample index at each position of the epoch's global order: a permutation, or with
        repeats its indices each ``repeats`` times in a row (position p holds copy p % repeats)."""
        generator = torch.Generator().manual_seed(self.seed + self.position.epoch)
        return torch.randperm(self.size, generator=generator).repeat_interleave(self.repeats)[:self.size]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        order, epoch, start = self.order().tolist(), self.position.epoch, self.position.consumed
        for size in self.global_batches():
            yield [SampleKey(epoch, order[p], p % self.repeats)
                   for p in range(start + self.rank, start + size, self.world_size)]
            start += size

    def __len__(self) -> int:
        return len(self.global_batches())


class EvalSampler(Sampler[SampleKey]):
    """Every sample exactly once across ranks, no padding: rank r takes indices r, r+W, r+2W..."""

    def __init__(self, size: int, num_replicas: int, rank: int) -> None:
        self.indices = range(rank, size, num_replicas)

    def __iter__(self) -> Iterator[SampleKey]:
        return iter([SampleKey(0, index) for index in self.indices])

    def __len__(self) -> int:
        return len(self.indices)


def seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker distinct Python and NumPy seeds derived from torch's, and its
    answer to a hang report (its stacks)."""
    # Stop signals are the main process's business. SLURM signals every process of a job step
    # (scancel, preemption, `scontrol requeue`, --signal), and torch re-arms SIGTERM in DataLoader
    # workers so that it kills them: the main process then dies mid-stop with "DataLoader worker
    # (pid N) is killed by signal: Terminated" instead of saving its checkpoint.
    for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    hangs.answer_in_worker(worker_id)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def shared_memory_warning(num_workers: int, batch_bytes: int, path: str = "/dev/shm") -> str | None:
    """A warning when ``path`` is too small for the batches DataLoader workers pass through it."""
    if num_workers == 0 or not os.path.isdir(path):
        return None
    free = shutil.disk_usage(path).free
    needed = 2 * num_workers * worker_plans.prefetch_factor(num_workers) * batch_bytes
    if free >= needed:
        return None
    return (f"{path} has {free / 2**20:.0f} MiB free but {num_workers} DataLoader workers need about "
            f"{needed / 2**20:.0f} MiB: expect 'Bus error' or a hang; enlarge it (docker run --shm-size=8g) "
            "or set data.num_workers=0")


def build_val_loader(split: Dataset, cfg: DataConfig, world_size: int, rank: int, device: torch.device,
                     seed: int, device_decode: bool = False) -> DataLoader:
    """This rank's share of the validation set with the eval transform: every sample counted once
    (JPEGs left encoded for the device with ``device_decode``).

    Its workers start at each validation and exit after it (never persistent): they would
    otherwise sit resident, holding memory, through every training epoch.
    """
    dataset = SeededTransformDataset(split, build_transform(cfg, False, device_decode), seed,
                                     cfg.on_bad_sample == "skip")
    return build_loader(dataset, EvalSampler(len(dataset), world_size, rank), cfg.val_batch_size or cfg.batch_size,
                        cfg, device, seed, drop_last=False, persistent=False)


def build_train_loader(dataset: Dataset, batches: TrainBatchSampler, cfg: DataConfig, device: torch.device,
                       seed: int) -> DataLoader:
    """The training DataLoader: ``batches`` decides what each micro-batch holds."""
    return DataLoader(dataset, batch_sampler=batches, **_loader_options(cfg, device, seed))


def build_loader(dataset: Dataset, sampler: Sampler, batch_size: int, cfg: DataConfig,
                 device: torch.device, seed: int, drop_last: bool, persistent: bool = True) -> DataLoader:
    """A DataLoader with the sensible defaults: workers, pinning on CUDA, per-worker seeds;
    ``persistent=False`` overrides ``data.persistent_workers``."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      **_loader_options(cfg, device, seed, persistent))


def _loader_options(cfg: DataConfig, device: torch.device, seed: int, persistent: bool = True) -> dict[str, Any]:
    workers = worker_plans.plan(cfg.num_workers, device.type).workers
    return dict(num_workers=workers, collate_fn=collate_skipping_bad,
                pin_memory=cfg.pin_memory and device.type == "cuda",
                persistent_workers=persistent and cfg.persistent_workers and workers > 0, worker_init_fn=seed_worker,
                generator=torch.Generator().manual_seed(seed),
                prefetch_factor=worker_plans.prefetch_factor(workers) or None)
