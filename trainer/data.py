"""Data sets, transforms, samplers and loaders.

Augmentation randomness is a pure function of (seed, epoch, sample index): each sample seeds its
own transform. The batches a rank sees therefore do not depend on the number of DataLoader
workers, and a run resumed in the middle of an epoch sees exactly the samples it would have seen.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate, get_worker_info
from torchvision import datasets, transforms

from trainer import decode, distributed, image_index, user_code
from trainer.config import DataConfig
from trainer.distributed import DistEnv
from trainer.errors import DataError

log = logging.getLogger(__name__)

TORCHVISION_SETS: dict[str, tuple[type, str]] = {
    "cifar10": (datasets.CIFAR10, "CIFAR-10 (cifar-10-batches-py/)"),
    "cifar100": (datasets.CIFAR100, "CIFAR-100 (cifar-100-python/)"),
    "mnist": (datasets.MNIST, "MNIST (MNIST/raw/)"),
    "fashionmnist": (datasets.FashionMNIST, "FashionMNIST (FashionMNIST/raw/)"),
}


@dataclass
class Splits:
    """The train and validation sets (yielding PIL images and int labels) and the class names."""

    train: Dataset
    val: Dataset
    classes: list[str]


def prepare(cfg: DataConfig, node: bool = True, once: bool = True) -> None:
    """One-time work before the data sets are opened.

    ``node`` work runs on one process per node (generating the synthetic set into the cache);
    ``once`` work on one process of the whole job (downloading a torchvision set, scanning an image
    folder into its index). Then barrier and call :func:`load_splits` on every process
    (:func:`prepared_splits` does all of it).
    """
    if node and cfg.source == "synthetic":
        _synthetic_root(cfg, create=True)
    if not once:
        return
    if cfg.source in TORCHVISION_SETS and cfg.download:
        _download(cfg)
    elif cfg.source in ("synthetic", "imagefolder"):
        load_splits(cfg)  # scans each split and caches its index, unless a current one is there


def prepared_splits(cfg: DataConfig, env: DistEnv) -> Splits:
    """:func:`prepare` (per node, and once per job on global rank 0), a barrier, then
    :func:`load_splits` on every process, which reads the index rank 0 left in the cache."""
    if env.topology.local_rank == 0 or env.rank == 0:
        prepare(cfg, node=env.topology.local_rank == 0, once=env.rank == 0)
    distributed.barrier(env)
    return load_splits(cfg)


def load_splits(cfg: DataConfig) -> Splits:
    """Open the configured data source without transforms."""
    if user_code.is_import_path(cfg.source):
        return _user_splits(cfg)
    cache = Path(os.path.expanduser(cfg.cache_dir))
    if cfg.source == "synthetic":
        return _image_folder_splits(_synthetic_root(cfg, create=False), cache)
    if cfg.source == "imagefolder":
        return _image_folder_splits(Path(os.path.expanduser(cfg.root)), cache)
    return _torchvision_splits(cfg.source, os.path.expanduser(cfg.root), downloaded_by_rank0=cfg.download)


def check_source(source: str) -> None:
    """Refuse, before any work, a ``data.source`` import path that cannot be imported."""
    if user_code.is_import_path(source):
        user_code.load_callable(source, "data.source")


def _user_splits(cfg: DataConfig) -> Splits:
    """``data.source=my_pkg.data:build``: ``build(cfg)`` returns (train, val, class names).

    The sets must be map-style (``__len__`` and ``__getitem__``): the distributed shard, exact
    mid-epoch resume and per-sample seeding all address samples by index.
    """
    spec = cfg.source
    result = user_code.load_callable(spec, "data.source")(cfg)
    if isinstance(result, Splits):
        return result
    if not (isinstance(result, (tuple, list)) and len(result) == 3):
        raise DataError(f"data.source: {spec}(cfg) returned {type(result).__name__}; "
                        "return (train_set, val_set, class_names)")
    train, val, classes = result
    for split, dataset in (("train", train), ("val", val)):
        if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise DataError(f"data.source: {spec} returned a {split} set of type {type(dataset).__name__}, not a "
                            "map-style Dataset (__len__ and __getitem__); exact resume and sharding need indices")
    if not (isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes)):
        raise DataError(f"data.source: {spec} returned class names {classes!r}; return a list of strings")
    return Splits(train, val, list(classes))


def _synthetic_root(cfg: DataConfig, create: bool) -> Path:
    from trainer.synthetic import SyntheticSpec, ensure_synthetic_dataset

    spec = SyntheticSpec(num_classes=cfg.synthetic_classes, train_per_class=cfg.synthetic_train_per_class,
                         val_per_class=cfg.synthetic_val_per_class, image_size=cfg.image_size,
                         seed=cfg.synthetic_seed)
    try:
        return ensure_synthetic_dataset(os.path.expanduser(cfg.cache_dir), spec)
    except ValueError as exc:
        raise DataError(f"synthetic data: {exc}") from None


def _image_folder_splits(root: Path, cache_dir: Path) -> Splits:
    if not root.is_dir():
        raise DataError(f"data.root '{root}' does not exist; point data.root at a folder with train/ and val/")
    found = {}
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"data.root '{root}' has no {split}/ folder; expected {root}/{split}/<class>/<image>")
        try:
            found[split] = image_index.load_split(root / split, cache_dir)
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"{root / split}: {' '.join(str(exc).split())}") from None
    train, val = found["train"], found["val"]
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"train/ and val/ under '{root}' have different classes "
                        f"(only in train: {only_train or '-'}; only in val: {only_val or '-'})")
    return Splits(train, val, list(train.classes))


def _torchvision_splits(source: str, root: str, download: bool = False, shown_root: str | None = None,
                        downloaded_by_rank0: bool = False) -> Splits:
    """The set's files under ``root`` (``shown_root``: the folder that error messages name;
    ``downloaded_by_rank0``: global rank 0 was to download them there before this call)."""
    cls, layout = TORCHVISION_SETS[source]
    shown = shown_root or root
    try:
        train = cls(root, train=True, download=download)
        val = cls(root, train=False, download=download)
    except RuntimeError as exc:
        hint = ("downloading failed or is impossible here; copy the files there by hand" if download else
                "global rank 0 downloads it into data.root: with several nodes, data.root must be a folder "
                "every node sees, or copy the files to each node" if downloaded_by_rank0 else
                "set data.download=true to fetch it, or copy the files there")
        raise DataError(f"{layout} not found or corrupt under data.root='{shown}' ({str(exc).splitlines()[0]}); "
                        f"{hint}") from None
    except OSError as exc:  # URLError and socket errors when the download has no network
        raise DataError(f"downloading {layout} to '{shown}' failed ({exc}); "
                        "copy the files there by hand and keep data.download=false") from None
    return Splits(train, val, list(train.classes))


def _download(cfg: DataConfig) -> None:
    """Download a torchvision set into a hidden folder beside its place, then rename it into place.

    A download that dies half-way leaves only the hidden folder (removed by the next try), never
    a half set under the name the loader looks for. A set already there and intact is kept.
    """
    root = Path(os.path.expanduser(cfg.root))
    try:
        _torchvision_splits(cfg.source, str(root))
        return
    except DataError:
        pass
    staging = root / f".download-{cfg.source}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _torchvision_splits(cfg.source, str(staging), download=True, shown_root=str(root))
        for entry in sorted(staging.iterdir()):
            target = root / entry.name
            if target.exists():  # an incomplete or corrupt copy: kept aside, not deleted
                aside = root / f"{entry.name}.incomplete-{int(time.time())}"
                log.warning("%s failed its check; moved it to %s and put the fresh download in its place",
                            target, aside)
                os.replace(target, aside)
            os.replace(entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_transform(cfg: DataConfig, train: bool) -> Callable[[Any], torch.Tensor]:
    """Train: random resized crop and flip (each optional); val: resize and centre crop.

    The result is a uint8 (3, H, W) tensor: :class:`trainer.normalize.Normalize` makes it float
    and normalises it on the device.
    """
    size = cfg.image_size
    steps: list[Callable] = []
    if train and cfg.random_resized_crop:
        steps.append(decode.ResizedCrop(size, (cfg.crop_scale_min, 1.0), cfg.jpeg_draft))
    else:
        steps += [decode.to_rgb, transforms.Resize(round(size / cfg.val_crop_fraction), antialias=True),
                  transforms.CenterCrop(size)]
    if train and cfg.hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps.append(decode.to_uint8_tensor)
    return TensorsPassThrough(transforms.Compose(steps))


class TensorsPassThrough:
    """Apply ``transform`` to images; a tensor item (from the user's own data set) passes as is."""

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, item: Any) -> torch.Tensor:
        return item if isinstance(item, torch.Tensor) else self.transform(item)


LOADER_PREFETCH = 4
"""Batches each DataLoader worker prepares ahead."""

SampleKey = tuple[int, int]
"""(epoch, index): what the samplers yield and :class:`SeededTransformDataset` reads."""


class SeededTransformDataset(Dataset):
    """Applies ``transform`` to ``base[index]`` with the torch RNG seeded from (seed, epoch, index).

    Unreadable samples raise :class:`DataError` naming the file, or, with ``skip_bad``, become
    ``None`` so :func:`collate_skipping_bad` drops and counts them.
    """

    def __init__(self, base: Dataset, transform: Callable, seed: int, skip_bad: bool = False) -> None:
        self.base, self.transform, self.seed, self.skip_bad = base, transform, seed, skip_bad

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int] | None:
        epoch, index = key
        # Seeded before reading too: a user's data set may draw in __getitem__. A loader worker's
        # generator serves this data set alone, so only the main process (no workers) needs its
        # state back; saving it costs about as much as the seeding.
        state = torch.get_rng_state() if get_worker_info() is None else None
        torch.default_generator.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
        try:
            try:
                image, target = self.base[index]
            except Exception as exc:  # any decoder error: PIL.UnidentifiedImageError, OSError, SyntaxError...
                return self._unreadable(index, exc)
            try:
                return self.transform(image), target
            except (OSError, SyntaxError) as exc:  # a lazily opened file's pixels decode here (truncated data)
                return self._unreadable(index, exc)
        finally:
            if state is not None:
                torch.set_rng_state(state)

    def _unreadable(self, index: int, exc: Exception) -> None:
        """``None`` in skip mode; else the error naming the sample."""
        if self.skip_bad:
            return None
        raise DataError(f"cannot read sample {self._describe(index)}: {exc}; "
                        "fix or remove it, or set data.on_bad_sample=skip") from None

    def _describe(self, index: int) -> str:
        if hasattr(self.base, "sample_path"):
            return f"'{self.base.sample_path(index)}'"
        samples: Sequence | None = getattr(self.base, "samples", None)  # e.g. the user's own ImageFolder
        return f"'{samples[index][0]}'" if samples else f"#{index}"


def collate_skipping_bad(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the readable samples; also return how many were dropped as unreadable."""
    good = [sample for sample in batch if sample is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(batch)
    images, targets = default_collate(good)
    return images, targets, len(batch) - len(good)


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

    The epoch's order is DistributedSampler's permutation (``randperm`` seeded with seed + epoch).
    Global micro-batch j covers positions [start + j*G, start + (j+1)*G) of it (G = batch x world)
    and rank r takes every world-th position from start + r: DistributedSampler's strided shards,
    so k micro-batches on W ranks consume exactly a prefix of the order, whatever W and the batch.
    The rest of the epoch that does not fill a global batch is served too (see
    :meth:`global_batches`), split as evenly as the stride does; only a rest smaller than the
    world size, where some rank would get nothing, is left out.
    """

    def __init__(self, size: int, world_size: int, rank: int, batch_size: int, seed: int) -> None:
        self.size, self.world_size, self.rank = size, world_size, rank
        self.batch_size, self.seed = batch_size, seed
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
        """The epoch's global permutation of sample indices."""
        generator = torch.Generator().manual_seed(self.seed + self.position.epoch)
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        order, epoch, start = self.order().tolist(), self.position.epoch, self.position.consumed
        for size in self.global_batches():
            yield [(epoch, order[p]) for p in range(start + self.rank, start + size, self.world_size)]
            start += size

    def __len__(self) -> int:
        return len(self.global_batches())


class EvalSampler(Sampler[SampleKey]):
    """Every sample exactly once across ranks, no padding: rank r takes indices r, r+W, r+2W..."""

    def __init__(self, size: int, num_replicas: int, rank: int) -> None:
        self.indices = range(rank, size, num_replicas)

    def __iter__(self) -> Iterator[SampleKey]:
        return iter([(0, index) for index in self.indices])

    def __len__(self) -> int:
        return len(self.indices)


def seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker distinct Python and NumPy seeds derived from torch's."""
    # Stop signals are the main process's business. SLURM signals every process of a job step
    # (scancel, preemption, `scontrol requeue`, --signal), and torch re-arms SIGTERM in DataLoader
    # workers so that it kills them: the main process then dies mid-stop with "DataLoader worker
    # (pid N) is killed by signal: Terminated" instead of saving its checkpoint.
    for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def shared_memory_warning(num_workers: int, batch_bytes: int, path: str = "/dev/shm") -> str | None:
    """A warning when ``path`` is too small for the batches DataLoader workers pass through it."""
    if num_workers == 0 or not os.path.isdir(path):
        return None
    free = shutil.disk_usage(path).free
    needed = 2 * num_workers * LOADER_PREFETCH * batch_bytes
    if free >= needed:
        return None
    return (f"{path} has {free / 2**20:.0f} MiB free but {num_workers} DataLoader workers need about "
            f"{needed / 2**20:.0f} MiB: expect 'Bus error' or a hang; enlarge it (docker run --shm-size=8g) "
            "or set data.num_workers=0")


def build_val_loader(split: Dataset, cfg: DataConfig, world_size: int, rank: int, device: torch.device,
                     seed: int) -> DataLoader:
    """This rank's share of the validation set with the eval transform: every sample counted once.

    Its workers start at each validation and exit after it (never persistent): they would
    otherwise sit resident, holding memory, through every training epoch.
    """
    dataset = SeededTransformDataset(split, build_transform(cfg, False), seed, cfg.on_bad_sample == "skip")
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
    workers = cfg.num_workers
    return dict(num_workers=workers, collate_fn=collate_skipping_bad,
                pin_memory=cfg.pin_memory and device.type == "cuda",
                persistent_workers=persistent and cfg.persistent_workers and workers > 0, worker_init_fn=seed_worker,
                generator=torch.Generator().manual_seed(seed),
                prefetch_factor=LOADER_PREFETCH if workers > 0 else None)
