"""Prepared shards (``data.source=prepared``): an image folder re-encoded by ``python -m trainer.prepare``
into a few large tar files, read by sample index with one ``pread`` each.

The layout is webdataset's: POSIX tar shards whose members are ``<key>.jpg`` (an RGB JPEG) and
``<key>.cls`` (the class number as text), so ``tar``, webdataset and any tar reader can open them.
Beside them, per split, a shard list in the format of webdataset's indexed datasets (wids:
``<split>.json`` with each shard's ``url``, ``nsamples``, ``filesize`` and our ``sha256``) and a
sample table (``<split>.samples.npy``: each sample's shard, the offset of its ``.jpg`` header in
it, the JPEG's size and CRC-32, and its class). ``prepared.json`` (the manifest) names the
classes, the counts, the short side and the quality; it is written last, and the whole folder is
renamed into place at the end, so a folder with a manifest is complete.

What is checked when: opening a split checks the manifest, the shard list and the sample table
against each other and every shard's size (cheap: one ``stat`` per shard, vectorised checks of the
table); reading a sample checks its tar header (name, size, checksum) and the CRC-32 of its bytes
(microseconds beside the decode). The SHA-256 of whole shards is checked only on request
(``python -m trainer.prepare --verify DST``): hashing an ImageNet-sized set at every start would
read every byte twice. Any mismatch is a :class:`DataError` naming the file and what to do.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from trainer.errors import DataError

FORMAT = "launchpad-prepared-1"
"""The manifest's ``format``: bump when the layout changes."""
MANIFEST = "prepared.json"
SPLITS = ("train", "val")
HEADER = tarfile.BLOCKSIZE
"""Every member has one 512-byte ustar header (keys are short: no long-name extension)."""
SAMPLE = np.dtype([("shard", "<i4"), ("offset", "<i8"), ("size", "<i8"), ("crc", "<u4"), ("target", "<i4")])
"""One row of ``<split>.samples.npy``; ``offset`` is where the ``.jpg`` member's header starts (its
``.cls`` member follows it)."""


def padded(size: int) -> int:
    """A member's data size rounded up to whole tar blocks."""
    return size + (-size % HEADER)


def member_span(size: int) -> int:
    """The bytes of one sample in its shard: the ``.jpg`` header and data, the ``.cls`` header and its block."""
    return HEADER + padded(size) + 2 * HEADER


def _member_problem(data: bytes, at: int, name: str, size: int, offset: int) -> str | None:
    """What is wrong with the tar member expected at ``data[at:]``, if anything."""
    try:
        info = tarfile.TarInfo.frombuf(data[at:at + HEADER], "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        return f"no valid tar header at byte {offset + at} ({exc})"
    if (info.name, info.size) != (name, size):
        return (f"the member at byte {offset + at} is {info.name!r} of {info.size} bytes, "
                f"the index says {name!r} of {size}")
    return None


def key(index: int) -> str:
    """The webdataset key of a split's ``index``-th sample (no dot: webdataset splits names at the first)."""
    return f"{index:08d}"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def shard_list_name(split: str) -> str:
    return f"{split}.json"


def samples_name(split: str) -> str:
    return f"{split}.samples.npy"


def again(root: Path) -> str:
    """What to do about a damaged prepared folder."""
    return (f"prepare it again (python -m trainer.prepare SRC {root}.new, then use that folder) "
            "or restore it from a copy")


@dataclass(frozen=True)
class Shard:
    path: Path
    samples: int
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    root: Path
    classes: list[str]
    short_side: int
    quality: int
    counts: dict[str, list[int]]  # split -> images per class
    raw: dict[str, Any]


def read_manifest(root: str | os.PathLike) -> Manifest:
    """The manifest of a prepared folder, or one line saying what is wrong with it."""
    root = Path(os.path.expanduser(root))
    path = root / MANIFEST
    if not root.is_dir():
        raise DataError(f"data.root '{root}' does not exist; make it with python -m trainer.prepare SRC {root}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"data.root '{root}' has no {MANIFEST}: not a folder python -m trainer.prepare "
                        f"finished; prepare it with python -m trainer.prepare SRC {root}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} ({_first(exc)}); {again(root)}") from None
    try:
        if raw["format"] != FORMAT:
            raise DataError(f"{path} is format {raw['format']!r}, this trainer reads {FORMAT!r}; "
                            f"prepare it again with this version (python -m trainer.prepare SRC {root}.new)")
        classes = raw["classes"]
        counts = {split: raw["splits"][split]["per_class"] for split in SPLITS}
        valid = (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
                 and all(isinstance(c, list) and len(c) == len(classes)
                         and all(type(n) is int and n >= 0 for n in c) for c in counts.values())
                 and type(raw["short_side"]) is int and type(raw["quality"]) is int)
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a prepared-data manifest (no {_first(exc)}); {again(root)}") from None
    if not valid:
        raise DataError(f"{path} is not a prepared-data manifest (classes or counts malformed); {again(root)}")
    return Manifest(root, list(classes), raw["short_side"], raw["quality"], counts, raw)


def read_shard_list(manifest: Manifest, split: str) -> list[Shard]:
    """A split's shards from its wids shard list, each checked to exist with its recorded size."""
    root = manifest.root
    path = root / shard_list_name(split)
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))
        shards = [Shard(root / entry["url"], entry["nsamples"], entry["filesize"], entry["sha256"])
                  for entry in listed["shardlist"]]
        valid = (listed.get("__kind__") == "wids-shard-index-v1" and shards
                 and all(type(s.samples) is int and s.samples > 0 and type(s.size) is int and isinstance(s.sha256, str)
                         and s.path.parent == root and not s.path.name.startswith(".") for s in shards))
    except FileNotFoundError:
        raise DataError(f"{path} is missing; {again(root)}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"cannot read the shard list {path} ({_first(exc)}); {again(root)}") from None
    if not valid:
        raise DataError(f"{path} is not a wids shard list of this folder's shards; {again(root)}")
    if sum(s.samples for s in shards) != sum(manifest.counts[split]):
        raise DataError(f"{path} lists {sum(s.samples for s in shards)} samples but {MANIFEST} counts "
                        f"{sum(manifest.counts[split])}; {again(root)}")
    for shard in shards:
        try:
            size = shard.path.stat().st_size
        except OSError as exc:
            raise DataError(f"shard {shard.path} is missing or unreadable ({exc.strerror or _first(exc)}); "
                            f"{again(root)}") from None
        if size != shard.size:
            raise DataError(f"shard {shard.path} has {size} bytes, {path.name} says {shard.size} "
                            f"(cut short or rewritten); {again(root)}")
    return shards


def read_samples(manifest: Manifest, split: str, shards: list[Shard]) -> np.ndarray:
    """A split's sample table (memory-mapped: forked loader workers share its pages), checked
    against its shard list and the manifest's counts."""
    root = manifest.root
    path = root / samples_name(split)
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path} is missing; {again(root)}") from None
    except Exception as exc:  # numpy parses a damaged header with ast and tokenize: SyntaxError, TokenError...
        raise DataError(f"cannot read the sample table {path} ({_first(exc)}); {again(root)}") from None
    problem = _table_problem(table, shards, manifest.counts[split])
    if problem:
        raise DataError(f"the sample table {path} does not match the shards: {problem}; {again(root)}")
    return table


def _table_problem(table: np.ndarray, shards: list[Shard], per_class: list[int]) -> str | None:
    """What makes ``table`` inconsistent with the shards and counts, if anything."""
    if table.dtype != SAMPLE or table.ndim != 1:
        return f"rows of {table.dtype} in {table.ndim} dimensions, not {SAMPLE}"
    if len(table) != sum(per_class):
        return f"{len(table)} rows for {sum(per_class)} samples"
    if len(table) == 0:
        return None
    shard, offset, size = table["shard"], table["offset"], table["size"]
    if shard.min() < 0 or shard.max() >= len(shards) or np.any(np.diff(shard) < 0):
        return "shard numbers out of range or out of order"
    if np.bincount(shard, minlength=len(shards)).tolist() != [s.samples for s in shards]:
        return "samples per shard differ from the shard list"
    ends = offset + 3 * HEADER + size + (-size % HEADER)
    if offset.min() < 0 or size.min() <= 0 or np.any(offset % HEADER) \
            or np.any(ends > np.asarray([s.size for s in shards], dtype=np.int64)[shard]):
        return "a sample lies outside its shard"
    targets = table["target"]
    if targets.min() < 0 or targets.max() >= len(per_class) \
            or np.bincount(targets, minlength=len(per_class)).tolist() != per_class:
        return "classes differ from the manifest's counts"
    return None


class PreparedImages(Dataset):
    """One split of a prepared folder: ``(image, target)`` with the JPEG opened from its bytes (not
    yet decoded, so the training crop can ask for a reduced-size decode), as an image folder gives.

    Shard files are opened lazily by the process that reads them (a forked loader worker opens its
    own; pickling drops them), and read with ``os.pread``: no shared file position.
    """

    def __init__(self, manifest: Manifest, split: str) -> None:
        self.root, self.split = manifest.root, split
        self.classes = manifest.classes
        self.shards = read_shard_list(manifest, split)
        self.samples = read_samples(manifest, split, self.shards)
        self.targets = self.samples["target"]
        self._files: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.samples)

    def sample_path(self, index: int) -> str:
        """Where sample ``index`` is (for error messages)."""
        return f"{self.shards[int(self.samples['shard'][index])].path}:{key(index)}.jpg"

    def read(self, index: int) -> bytes:
        """The JPEG bytes of sample ``index``, after checking its two tar headers (names, sizes,
        checksums), the CRC-32 of its bytes and its class in the ``.cls`` member."""
        row = self.samples[index]
        shard, offset, size = self.shards[int(row["shard"])], int(row["offset"]), int(row["size"])
        data = os.pread(self._file(int(row["shard"])), member_span(size), offset)
        name, target = key(index), int(row["target"])
        problem = (_member_problem(data, 0, f"{name}.jpg", size, offset)
                   or _member_problem(data, HEADER + padded(size), f"{name}.cls", len(str(target)), offset))
        if problem is None and zlib.crc32(data[HEADER:HEADER + size]) != int(row["crc"]):
            problem = f"the bytes of {name}.jpg differ from those prepared (CRC-32)"
        cls_at = 2 * HEADER + padded(size)
        if problem is None and data[cls_at:cls_at + len(str(target))] != str(target).encode():
            problem = f"{name}.cls does not hold class {target} of the index"
        if problem:
            raise DataError(f"prepared shard {shard.path} is damaged: {problem}; {again(self.root)}")
        return data[HEADER:HEADER + size]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.open(io.BytesIO(self.read(index))), int(self.targets[index])

    def _file(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors are the parent's business
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = os.open(self.shards[shard].path, os.O_RDONLY)
        return self._files[shard]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for descriptor in self._files.values():
                os.close(descriptor)


def load_splits(root: str | os.PathLike) -> tuple[PreparedImages, PreparedImages, list[str]]:
    """The train and validation splits of a prepared folder and its class names."""
    manifest = read_manifest(root)
    return PreparedImages(manifest, "train"), PreparedImages(manifest, "val"), manifest.classes


def _first(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
