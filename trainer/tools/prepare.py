"""``python -m trainer.prepare SRC DST --short-side N``: an image folder as prepared shards.

Every image of ``SRC/train`` and ``SRC/val`` (found as ``data.source=imagefolder`` finds them) is
decoded, made RGB, shrunk so that its short side is at most N (never enlarged) and re-encoded as
a JPEG into webdataset tar shards with an index (:mod:`trainer.data.shards`), which
``data.source=prepared data.root=DST`` reads. Images already small are re-encoded too: every
sample is then a baseline RGB JPEG, which the reduced-size decode of the training crop and GPU
JPEG decoders take, whatever the source held (CMYK, PNG, palette, 16-bit).

Why: a training crop of a 500x375 photo decodes the whole photo; at N=256 it decodes a third of
the pixels. And a few files of 256 MB instead of a million small ones is what network file
systems and object stores serve well.

The output is a pure function of the source and the options (the same bytes with any
``--workers``); it is written into a hidden folder beside DST that is renamed to DST at the end,
so an interrupted run leaves no DST that looks complete. An existing DST is never overwritten.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from trainer import config
from trainer.checkpoint import atomic
from trainer.data import decode, shards, sources
from trainer.data.image_index import IndexedImageFolder
from trainer.errors import EXIT_OK, EXIT_USER_ERROR, DataError, UserError, one_line
from trainer.parallel import openmp

DEFAULT_QUALITY = 90
DEFAULT_SHARD_MB = 256


@dataclass(frozen=True)
class Options:
    short_side: int
    quality: int = DEFAULT_QUALITY
    shard_bytes: int = DEFAULT_SHARD_MB * 2**20
    workers: int = 1
    skip_bad: bool = False
    cache_dir: str = config.DataConfig.cache_dir


def reencode(path: str, short_side: int, quality: int) -> bytes:
    """The image at ``path`` as RGB JPEG bytes, its short side shrunk to ``short_side`` if longer."""
    with Image.open(path) as image:
        width, height = image.size
        scale = short_side / min(width, height)
        if scale < 1:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image.draft("RGB", size)  # a JPEG decodes at 1/2, 1/4 or 1/8 while that stays >= size
            image = decode.to_rgb(image).resize(size, Image.Resampling.LANCZOS)
        else:
            image = decode.to_rgb(image)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _encode(job: tuple[str, int, int]) -> bytes | str:
    """A pool task: the JPEG bytes, or why the file could not be read (a str)."""
    try:
        return reencode(*job)
    except Exception as exc:  # any decoder error: UnidentifiedImageError, OSError, DecompressionBombError...
        return " ".join(str(exc).split()) or type(exc).__name__


class ShardWriter:
    """Writes one split's samples into tar shards of about ``target`` bytes, keeping the sample
    table and each shard's size and SHA-256 as it goes."""

    def __init__(self, folder: Path, split: str, target: int) -> None:
        self.folder, self.split, self.target = folder, split, target
        self.rows: list[tuple[int, int, int, int, int]] = []
        self.shards: list[dict] = []
        self.file: io.BufferedWriter | None = None

    def add(self, jpeg: bytes, target: int) -> None:
        name = shards.key(len(self.rows))
        members = [(f"{name}.jpg", jpeg), (f"{name}.cls", str(target).encode())]
        size = sum(shards.HEADER + shards.padded(len(data)) for _, data in members)
        if self.file is None or (self.written > 0 and self.written + size > self.target):
            self._next_shard()
        self.rows.append((len(self.shards) - 1, self.written, len(jpeg), zlib.crc32(jpeg), target))
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
            self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
            self._write(data + bytes(shards.padded(len(data)) - len(data)))
        self.shards[-1]["nsamples"] += 1

    def close(self) -> tuple[list[dict], np.ndarray]:
        """The shard list (wids entries) and the sample table."""
        self._finish_shard()
        return self.shards, np.array(self.rows, dtype=shards.SAMPLE)

    def _next_shard(self) -> None:
        self._finish_shard()
        name = shards.shard_name(self.split, len(self.shards))
        self.file = open(self.folder / name, "wb")
        self.digest, self.written = hashlib.sha256(), 0
        self.shards.append({"url": name, "nsamples": 0})

    def _finish_shard(self) -> None:
        if self.file is None:
            return
        self._write(bytes(2 * shards.HEADER))  # the end-of-archive marker
        self._write(bytes(-self.written % tarfile.RECORDSIZE))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        self.shards[-1].update(filesize=self.written, sha256=self.digest.hexdigest())

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.written += len(data)


def open_source(src: Path, cache_dir: str) -> sources.Splits:
    """SRC's train and val splits as ``data.source=imagefolder`` reads them (one-line errors)."""
    cfg = config.load([], ["data.source=imagefolder", f"data.root={src}", f"data.cache_dir={cache_dir}"])
    try:
        return sources.load_splits(cfg.data)
    except DataError as exc:  # the trainer's words, for the trainer's key
        raise DataError(str(exc).replace("data.root", "SRC")) from None


def fingerprint(splits: sources.Splits) -> str:
    """A digest of the source's file list and classes (not of the files' bytes)."""
    digest = hashlib.sha256(json.dumps(splits.classes).encode())
    for split in (splits.train, splits.val):
        assert isinstance(split, IndexedImageFolder)
        for array in (split.index.paths, split.index.offsets, split.index.targets):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def settings(src: Path, splits: sources.Splits, options: Options) -> dict:
    """What decides the prepared bytes: a DST with other settings is not this preparation."""
    return {"source": str(src), "source_files": fingerprint(splits), "short_side": options.short_side,
            "quality": options.quality, "shard_bytes": options.shard_bytes, "skip_bad": options.skip_bad}


def prepare(src: str | os.PathLike, dst: str | os.PathLike, options: Options, say=print) -> bool:
    """Prepare ``src`` into ``dst``; False when ``dst`` already holds this preparation (nothing done)."""
    src, dst = Path(os.path.abspath(os.path.expanduser(src))), Path(os.path.abspath(os.path.expanduser(dst)))
    if dst == src or src in dst.parents:
        raise DataError(f"{dst} is inside the source {src}; the prepared folder must be outside it")
    splits = open_source(src, options.cache_dir)
    wanted = settings(src, splits, options)
    if _already_there(dst, wanted):
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(dst)
    staging = atomic.temporary_name(dst)
    staging.mkdir()
    try:
        manifest = {"format": shards.FORMAT, "classes": splits.classes, **wanted, "splits": {},
                    "tool": "python -m trainer.prepare", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with _pool(options.workers) as pool:
            for split, dataset in (("train", splits.train), ("val", splits.val)):
                manifest["splits"][split] = _write_split(staging, split, dataset, len(splits.classes), options, pool,
                                                         say)
        atomic_json(staging / shards.MANIFEST, manifest)
        atomic.fsync_folder(staging)
        os.rename(staging, dst)  # replaces an empty folder, fails on any other
        atomic.fsync_folder(dst.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True


def _write_split(folder: Path, split: str, dataset: IndexedImageFolder, num_classes: int, options: Options,
                 pool, say) -> dict:
    writer = ShardWriter(folder, split, options.shard_bytes)
    skipped, started, shown = [], time.monotonic(), time.monotonic()
    jobs = ((dataset.sample_path(i), options.short_side, options.quality) for i in range(len(dataset)))
    for index, result in enumerate(pool(_encode, jobs)):
        if isinstance(result, str):
            if not options.skip_bad:
                raise DataError(f"cannot read {dataset.sample_path(index)}: {result}; fix or remove it, "
                                "or pass --skip-bad to leave such files out")
            skipped.append(os.path.relpath(dataset.sample_path(index), dataset.root))
            continue
        writer.add(result, int(dataset.targets[index]))
        if time.monotonic() - shown > 30:
            shown = time.monotonic()
            say(f"{split}: {index + 1}/{len(dataset)} images, {(index + 1) / (shown - started):.0f} images/s")
    shard_list, table = writer.close()
    if not len(table):
        raise DataError(f"every image of {dataset.root} was unreadable; nothing to prepare")
    listed = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split, "shardlist": shard_list}
    atomic_json(folder / shards.shard_list_name(split), listed)
    with open(folder / shards.samples_name(split), "wb") as file:
        np.save(file, table, allow_pickle=False)
    per_class = np.bincount(table["target"], minlength=num_classes).tolist()
    mib = sum(s["filesize"] for s in shard_list) / 2**20
    say(f"{split}: {len(table)} images in {len(shard_list)} shards ({mib:.1f} MiB) in "
        f"{time.monotonic() - started:.1f} s" + (f"; skipped {len(skipped)} unreadable" if skipped else ""))
    return {"per_class": per_class, "skipped": skipped}


def atomic_json(path: Path, value: dict) -> None:
    with atomic.replacing(path, durable=True) as file:
        file.write((json.dumps(value, indent=1) + "\n").encode())


class _pool:
    """``pool(function, jobs)`` maps in order: in this process, or in forked worker processes."""

    def __init__(self, workers: int) -> None:
        self.executor = (ProcessPoolExecutor(workers, mp_context=get_context("fork")) if workers > 1 else None)

    def __enter__(self) -> "_pool":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)

    def __call__(self, function, jobs) -> Iterator:
        if self.executor is None:
            return map(function, jobs)
        return self.executor.map(function, jobs, chunksize=16)


def _already_there(dst: Path, wanted: dict) -> bool:
    """True when ``dst`` holds this very preparation; False when it is absent or an empty folder;
    a refusal for anything else there."""
    if not os.path.lexists(dst):
        return False
    if dst.is_dir() and not any(dst.iterdir()):
        return False
    try:
        found = json.loads((dst / shards.MANIFEST).read_text(encoding="utf-8"))
        differ = [f"{key} {found.get(key)} -> {value}" for key, value in wanted.items() if found.get(key) != value]
        why = "; ".join(differ).replace(f"source_files {found.get('source_files')} -> {wanted['source_files']}",
                                        "other source files")
    except (OSError, ValueError, AttributeError):
        differ, why = ["manifest"], f"no readable {shards.MANIFEST}"
    if differ:
        raise DataError(f"{dst} exists and is not this preparation ({why}); prepare never overwrites: "
                        "remove it or choose another DST")
    return True


def _remove_leftovers(dst: Path) -> None:
    """Staging folders of earlier runs for ``dst`` whose process is gone (killed mid-way)."""
    for path in dst.parent.glob(f".{dst.name}.tmp.*"):
        pid = path.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def verify(dst: str | os.PathLike) -> str:
    """Check a prepared folder through: every shard's SHA-256 and every sample's header and CRC-32."""
    manifest = shards.read_manifest(dst)
    counts = []
    for split in shards.SPLITS:
        dataset = shards.PreparedImages(manifest, split)
        for shard in dataset.shards:
            digest = hashlib.sha256()
            with open(shard.path, "rb") as file:
                while chunk := file.read(2**22):
                    digest.update(chunk)
            if digest.hexdigest() != shard.sha256:
                raise DataError(f"prepared shard {shard.path} is damaged: its SHA-256 differs from "
                                f"{shards.shard_list_name(split)}; {shards.again(manifest.root)}")
        for index in range(len(dataset)):
            dataset.read(index)
        counts.append(f"{split} {len(dataset)} images in {len(dataset.shards)} shards")
    return f"{manifest.root}: {', '.join(counts)}; every SHA-256 and sample checked"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, nargs="?", help="an image folder: SRC/train/<class>/*, SRC/val/<class>/*")
    parser.add_argument("dst", type=Path, help="the prepared folder to create (data.root with data.source=prepared)")
    parser.add_argument("--short-side", type=int, help="shrink every image so that its short side is at most this")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality, 1-95 (default %(default)s)")
    parser.add_argument("--shard-size-mb", type=int, default=DEFAULT_SHARD_MB,
                        help="about this many MiB per tar shard (default %(default)s)")
    parser.add_argument("--workers", type=int, default=openmp.usable_cores(),
                        help="encoding processes (default: the cores this process may use, %(default)s)")
    parser.add_argument("--skip-bad", action="store_true", help="leave unreadable images out (listed in the manifest)")
    parser.add_argument("--cache-dir", default=config.DataConfig.cache_dir, help="where the source's index is kept")
    parser.add_argument("--verify", action="store_true",
                        help="only check DST: every shard's SHA-256 and every sample (--verify DST)")
    args = parser.parse_args(argv)
    try:
        if args.verify:
            if args.src is not None:
                raise UserError("--verify takes only DST: python -m trainer.prepare --verify DST")
            print(verify(args.dst), flush=True)
            return EXIT_OK
        if args.src is None or args.short_side is None:
            raise UserError("give SRC, DST and --short-side N, e.g. python -m trainer.prepare /data/imagenet "
                            "/data/imagenet-256 --short-side 256")
        limits = (("--short-side", args.short_side, 1, None), ("--quality", args.quality, 1, 95),
                  ("--shard-size-mb", args.shard_size_mb, 1, None), ("--workers", args.workers, 1, None))
        for name, value, low, high in limits:
            if value < low or (high is not None and value > high):
                raise UserError(f"{name}: must be in [{low}, {high or 'any'}], got {value}")
        options = Options(args.short_side, args.quality, args.shard_size_mb * 2**20, args.workers, args.skip_bad,
                          args.cache_dir)
        if prepare(args.src, args.dst, options):
            print(f"prepared {args.dst} (short side {args.short_side}, quality {args.quality}); train on it with "
                  f"data.source=prepared data.root={args.dst}", flush=True)
        else:
            print(f"{args.dst} already holds {args.src} prepared with these options; nothing to do", flush=True)
        return EXIT_OK
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        print(f"error: {exc.filename or args.dst}: {exc.strerror or one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
