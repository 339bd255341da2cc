"""Where the data comes from: the synthetic set, an image folder, a torchvision set or the user's
``build(cfg)``, opened as train and validation sets without transforms.

One-time work (generating, downloading, indexing) runs on as few processes as it needs and the
others wait at a barrier: see :func:`prepared_splits`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset, IterableDataset
from torchvision import datasets

from trainer.config import DataConfig, user_code
from trainer.data import image_index, labels, shards
from trainer.errors import DataError
from trainer.parallel import distributed
from trainer.parallel.distributed import DistEnv

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


def prepare(cfg: DataConfig, node: bool = True, once: bool = True) -> Splits | None:
    """One-time work before the data sets are opened; the splits when that work opened them.

    ``node`` work runs on one process per node (generating the synthetic set into the cache);
    ``once`` work on one process of the whole job (downloading a torchvision set, scanning an image
    folder into its index). Then barrier and call :func:`load_splits` on every other process
    (:func:`prepared_splits` does all of it).
    """
    if node and cfg.source == "synthetic":
        _synthetic_root(cfg, create=True)
    if not once:
        return None
    if cfg.source in TORCHVISION_SETS and cfg.download:
        _download(cfg)
    elif cfg.source in ("synthetic", "imagefolder"):
        return load_splits(cfg)  # scans each split and caches its index, unless a current one is there
    return None


def prepared_splits(cfg: DataConfig, env: DistEnv, multi_hot: bool = False) -> Splits:
    """:func:`prepare` (per node, and once per job on global rank 0), a barrier, then
    :func:`load_splits` on every process that has no splits yet: it reads the index rank 0 left.

    ``multi_hot`` (a multi-label task): an image folder's labels come from its label files.
    """
    if multi_hot and not user_code.is_import_path(cfg.source):
        return _labelled_splits(cfg)
    splits = None
    if env.topology.local_rank == 0 or env.rank == 0:
        splits = prepare(cfg, node=env.topology.local_rank == 0, once=env.rank == 0)
    distributed.barrier(env)
    return splits if splits is not None else load_splits(cfg)


def _labelled_splits(cfg: DataConfig) -> Splits:
    """``data.root/train.csv`` and ``val.csv`` (or ``.json``): several labels per image."""
    if cfg.source != "imagefolder":
        raise DataError(f"data.source={cfg.source} has one label per image; a multi-label task needs "
                        "data.source=imagefolder with train.csv and val.csv in data.root, or your own data.source")
    root = Path(os.path.expanduser(cfg.root))
    found = labels.read_label_files(root)
    return Splits(labels.MultiLabelImages(root, found.train, len(found.classes)),
                  labels.MultiLabelImages(root, found.val, len(found.classes)), found.classes)


def load_splits(cfg: DataConfig) -> Splits:
    """Open the configured data source without transforms."""
    if user_code.is_import_path(cfg.source):
        return _user_splits(cfg)
    cache = Path(os.path.expanduser(cfg.cache_dir))
    if cfg.source == "synthetic":
        return _image_folder_splits(_synthetic_root(cfg, create=False), cache)
    if cfg.source == "imagefolder":
        return _image_folder_splits(Path(os.path.expanduser(cfg.root)), cache)
    if cfg.source == "prepared":
        return Splits(*shards.load_splits(cfg.root))
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
    from trainer.data.synthetic import SyntheticSpec, ensure_synthetic_dataset

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
