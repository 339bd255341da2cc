"""An ImageFolder split scanned once and kept as an index file in the cache.

Walking an ImageNet-sized tree takes minutes on a network file system, and
``torchvision.datasets.ImageFolder`` keeps a list of ``(str, int)`` tuples that every forked
DataLoader worker copies page by page as it reads them (each access writes the objects' reference
counts). Here the split is walked once per version of the tree and saved as one byte array of
relative paths, their offsets and int32 targets; reading it back is a single file read, and a
worker reading it touches no Python object per sample, so its memory does not grow with the set.

The index is keyed by the split folder and the modification times of the root, the split folder,
each class folder and any folder nested in one: adding, removing or renaming a file changes its
folder's time and so the key. A file rewritten in place keeps the key (the index holds names only).
Hidden entries (names starting with a dot: ``._*`` AppleDouble copies, ``.DS_Store``,
``.ipynb_checkpoints``) are skipped; other files are samples when their extension is one of
ImageFolder's ``IMG_EXTENSIONS``, as with ImageFolder. Class order is ImageFolder's (sorted names).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import zipfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from trainer.checkpoint import atomic
from trainer.data import decode

log = logging.getLogger(__name__)

INDEX_FORMAT = "image-index-1"
"""Part of every key: bump it when the scanning rules or the file layout change."""


@dataclass
class ImageIndex:
    """One split's samples: relative paths packed in ``paths`` (``offsets[i]:offsets[i + 1]``) and targets.

    ``nested`` lists folders found below class folders with their modification times, so that a
    file added there invalidates the index too.
    """

    classes: list[str]
    paths: np.ndarray  # uint8, the encoded relative paths concatenated
    offsets: np.ndarray  # int64, len(samples) + 1
    targets: np.ndarray  # int32
    nested: dict[str, int]
    hidden: int  # hidden files and folders skipped by the scan

    def __len__(self) -> int:
        return len(self.targets)

    def relative_path(self, index: int) -> str:
        return os.fsdecode(self.paths[self.offsets[index]:self.offsets[index + 1]].tobytes())


class IndexedImageFolder(Dataset):
    """``root/<class>/**/<image>`` from an :class:`ImageIndex`: yields ``(loader(path), target)``.

    ``loader`` is the one place that opens a file: swap it for another decoder.
    """

    def __init__(self, root: str | Path, index: ImageIndex, loader: Callable[[str], Any] = decode.open_image) -> None:
        self.root = str(root)
        self.index, self.loader = index, loader
        self.classes = index.classes
        self.class_to_idx = {name: i for i, name in enumerate(index.classes)}
        self.targets = index.targets

    def __len__(self) -> int:
        return len(self.index)

    def sample_path(self, index: int) -> str:
        """The file behind sample ``index`` (for error messages)."""
        return os.path.join(self.root, self.index.relative_path(index))

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.loader(self.sample_path(index)), int(self.targets[index])


def load_split(split_dir: Path, cache_dir: Path) -> IndexedImageFolder:
    """The split's data set from its cached index; scan (and cache) it when absent or outdated.

    Raises ``FileNotFoundError`` (ImageFolder's messages) when there is no class folder or a class
    has no image. A cache folder that cannot be written costs a rescan next time, nothing else.
    """
    index = read_or_scan(split_dir, cache_dir)
    return IndexedImageFolder(split_dir, index)


def read_or_scan(split_dir: Path, cache_dir: Path) -> ImageIndex:
    """The cached index of ``split_dir`` if it is current; otherwise scan, write it and return it."""
    split_dir = Path(os.path.abspath(split_dir))
    classes, version = _version(split_dir)
    path = _index_path(cache_dir, split_dir, version)
    cached = _read(path, split_dir, classes)
    if cached is not None:
        log.debug("read the index of %s (%d images) from %s", split_dir, len(cached), path)
        return cached
    started = time.perf_counter()
    index = scan(split_dir, classes)
    hidden = (f"; skipped {index.hidden} hidden files and folders (dotfiles, ._* AppleDouble copies, .DS_Store)"
              if index.hidden else "")
    log.info("indexed %d images in %d classes under %s in %.1f s%s", len(index), len(classes), split_dir,
             time.perf_counter() - started, hidden)
    _write(path, index)
    return index


def scan(split_dir: Path, classes: list[str]) -> ImageIndex:
    """Walk every class folder (sorted, as ImageFolder does), skipping hidden entries."""
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {split_dir}.")
    names: list[bytes] = []
    targets: list[int] = []
    nested: dict[str, int] = {}
    hidden = sum(1 for entry in os.scandir(split_dir) if entry.name.startswith(".") and entry.is_dir())
    empty = []
    encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # os.fsencode's
    for target, name in enumerate(classes):
        count = len(names)
        class_dir = split_dir / name
        for folder, dirs, files in sorted(_walk(class_dir)):
            hidden += sum(1 for d in dirs if d.startswith("."))
            relative = os.path.relpath(folder, split_dir)
            if folder != str(class_dir):
                nested[relative] = os.stat(folder).st_mtime_ns
            prefix = (relative + os.sep).encode(encoding, errors)
            for file in sorted(files):
                if file.startswith("."):
                    hidden += 1
                elif file.lower().endswith(IMG_EXTENSIONS):
                    names.append(prefix + file.encode(encoding, errors))
        targets.extend([target] * (len(names) - count))
        if len(names) == count:
            empty.append(name)
    if empty:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(empty))}. "
                                f"Supported extensions are: {', '.join(IMG_EXTENSIONS)}")
    lengths = np.fromiter((len(n) for n in names), dtype=np.int64, count=len(names))
    offsets = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    paths = np.frombuffer(b"".join(names), dtype=np.uint8).copy()
    return ImageIndex(classes, paths, offsets, np.asarray(targets, dtype=np.int32), nested, hidden)


def _walk(class_dir: Path) -> list[tuple[str, list[str], list[str]]]:
    """``os.walk`` (following links, as ImageFolder) that does not descend into hidden folders."""
    found = []
    for folder, dirs, files in os.walk(class_dir, followlinks=True):
        found.append((folder, list(dirs), files))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return found


def _version(split_dir: Path) -> tuple[list[str], str]:
    """The split's class names and a digest of the folder times the index depends on."""
    digest = hashlib.sha256(INDEX_FORMAT.encode())
    for folder in (split_dir.parent, split_dir):
        digest.update(f"{folder}:{os.stat(folder).st_mtime_ns}\n".encode())
    classes = []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):  # is_dir follows links, as ImageFolder
            classes.append(entry.name)
            digest.update(f"{entry.name}:{entry.stat().st_mtime_ns}\n".encode())
    return classes, digest.hexdigest()[:20]


def _index_path(cache_dir: Path, split_dir: Path, version: str) -> Path:
    folder_id = hashlib.sha256(os.fsencode(split_dir)).hexdigest()[:16]
    return cache_dir / "image-index" / f"{folder_id}-{version}.npz"


def _read(path: Path, split_dir: Path, classes: list[str]) -> ImageIndex | None:
    """The index at ``path`` if it exists, is readable and its classes and nested folders are unchanged."""
    try:
        with np.load(path) as stored:
            arrays = {key: stored[key] for key in stored.files}
        names = [os.fsdecode(name) for name in _split(arrays["nested_names"])]
        nested = dict(zip(names, arrays["nested_mtimes"].tolist()))
        if arrays["classes"].tolist() != classes or not _consistent(arrays, len(classes)) \
                or len(names) != len(nested) or any(
                os.stat(split_dir / name).st_mtime_ns != mtime for name, mtime in nested.items()):
            return None
        return ImageIndex(classes, arrays["paths"], arrays["offsets"], arrays["targets"], nested,
                          int(arrays["hidden"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent, damaged, a folder gone
        return None


def _consistent(arrays: dict[str, np.ndarray], num_classes: int) -> bool:
    """Whether the arrays are an index :func:`_write` could have written: every sample a span of
    ``paths`` and a class (a file written by another version, or altered, is scanned afresh)."""
    paths, offsets, targets = arrays["paths"], arrays["offsets"], arrays["targets"]
    shapes = (paths.ndim, offsets.ndim, targets.ndim, arrays["hidden"].ndim, arrays["nested_mtimes"].ndim)
    if shapes != (1, 1, 1, 0, 1) or (paths.dtype, offsets.dtype, targets.dtype) != (np.uint8, np.int64, np.int32):
        return False
    if len(offsets) != len(targets) + 1 or offsets[0] != 0 or offsets[-1] != len(paths):
        return False
    return bool(np.all(np.diff(offsets) > 0) and np.all((targets >= 0) & (targets < num_classes))
                and arrays["nested_mtimes"].dtype == np.int64 and arrays["hidden"].dtype == np.int64)


def _split(packed: np.ndarray) -> list[bytes]:
    joined = packed.tobytes()
    return joined.split(b"\0") if joined else []


def _write(path: Path, index: ImageIndex) -> None:
    """Write atomically (a temporary file in the same folder, then a rename); remove older versions."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(path, durable=True) as file:
            np.savez(file, classes=np.asarray(index.classes), paths=index.paths, offsets=index.offsets,
                     targets=index.targets, hidden=np.int64(index.hidden),
                     nested_names=np.frombuffer(b"\0".join(os.fsencode(n) for n in index.nested), dtype=np.uint8),
                     nested_mtimes=np.asarray(list(index.nested.values()), dtype=np.int64))
    except OSError as exc:
        log.warning("could not cache the image index in %s (%s); the folder will be scanned again next time",
                    path.parent, exc)
        return
    prefix = path.name.split("-")[0] + "-"
    for old in path.parent.glob(f"{prefix}*.npz"):
        if old != path:
            with suppress(OSError):
                old.unlink(missing_ok=True)
