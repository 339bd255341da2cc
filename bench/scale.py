"""``python -m bench.scale [--quick]``: ImageNet-sized folders, from the scan to the loader workers.

On a generated tree of tiny images (200,000 in train/ by default, about 1 KB each, kept in a
cache folder and reused by later runs) it measures:

* the first scan (the walk that writes the index) and the cached one (reading the index), each
  against torchvision's ``ImageFolder``, which walks the tree every time;
* a cached start of a 4-process gloo job under torchrun: seconds from a barrier after the process
  group is up to the moment every rank has its index (goal < 2 s), and how many ranks walked;
* a loader worker's memory (USS: pages only it holds; RSS) after it has read every sample's path of
  a 200k set, minus the same on a tiny set (goal: within 50 MB), against ``ImageFolder``;
* the memory that validation loader workers kept resident through training when they were
  persistent, against now (they exit after each validation).

Paths are read through the data set's "open this path" callable swapped for ``len``, so the
numbers are about the bookkeeping, not decoding. The tree is in the page cache after generation:
the scans are warm-cache scans (a network file system is slower on both sides).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets

from bench import report
from bench.common import Row
from trainer import config
from trainer.data import image_index, loaders, sources

REPO = Path(__file__).resolve().parents[1]
MEMORY_GOAL_MB = 50.0
START_GOAL_S = 2.0
T = TypeVar("T")


@dataclass(frozen=True)
class Tree:
    """The generated set: ``classes`` folders per split, ``per_class`` images each in train/."""

    classes: int = 1000
    per_class: int = 200
    val_per_class: int = 5

    @property
    def images(self) -> int:
        return self.classes * self.per_class


FULL, QUICK = Tree(), Tree(classes=10, per_class=20, val_per_class=2)


def generate(tree: Tree, cache: Path) -> Path:
    """The tree under ``cache`` (written once, atomically: a temporary folder renamed when complete)."""
    root = cache / f"bench-scale-{tree.classes}x{tree.per_class}"
    if root.is_dir():
        return root
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=cache))
    rng = np.random.default_rng(0)
    for split, count in (("train", tree.per_class), ("val", tree.val_per_class)):
        for label in range(tree.classes):
            folder = staging / split / f"n{label:08d}"
            folder.mkdir(parents=True)
            png = _tiny_png(rng)
            for i in range(count):  # bytes after IEND differ per file; decoders ignore them
                (folder / f"{label:04d}_{i:05d}.png").write_bytes(png + i.to_bytes(4, "little"))
    os.replace(staging, root)
    return root


def _tiny_png(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def _timed(function: Callable[..., T], *args: Any) -> tuple[float, T]:
    """Seconds ``function(*args)`` took, and its result."""
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


# --------------------------------------------------------------------------------------- scans
def scans(root: Path, cache: Path) -> list[Row]:
    """First and cached scan of train/ (index) vs ImageFolder's walk."""
    first, index = _timed(image_index.read_or_scan, root / "train", cache)
    cached, again = _timed(image_index.read_or_scan, root / "train", cache)
    assert len(again) == len(index)
    walk, folder = _timed(datasets.ImageFolder, str(root / "train"))
    image_index.read_or_scan(root / "val", cache)  # so that the multi-rank start below finds both cached
    assert len(folder) == len(index)
    n = len(index)
    return [Row(f"scale: first scan of train/ ({n} images), index written", "s", first, walk, "ImageFolder walk",
                None, False),
            Row(f"scale: cached scan of train/ ({n} images), index read", "s", cached, walk, "ImageFolder walk",
                None, False, note="ImageFolder walks the tree at every start, on every rank")]


# ---------------------------------------------------------------------------------- multi-rank
def ranked_start(root: Path, cache: Path, processes: int) -> Row:
    """A cached start of a ``processes``-rank gloo job: seconds until every rank has its index."""
    overrides = ["data.source=imagefolder", f"data.root={root}", f"data.cache_dir={cache}", "dist.timeout_s=120"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "bench.scale_ranks", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the {processes}-process start failed:\n{(done.stdout + done.stderr)[-3000:]}")
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert sum(result["scans"]) == 0, result  # cached: nobody walks
    return Row(f"scale: cached start of {processes} gloo ranks, index ready on every rank", "s",
               result["ready_s"], START_GOAL_S, f"goal {START_GOAL_S:g} s", 1.0, False,
               note=f"from a barrier after init_process_group to the last rank's prepared_splits; "
                    f"train sizes seen {result['train']}")


# -------------------------------------------------------------------------------------- memory
class _WorkerMemory:
    """A collate function, run in the loader worker: this process's (USS, RSS) in MB after the batch."""

    def __call__(self, batch: list) -> tuple[float, float]:
        info = psutil.Process().memory_full_info()
        return info.uss / 2**20, info.rss / 2**20


def worker_memory(dataset: Dataset) -> tuple[float, float]:
    """(USS, RSS) of one forked loader worker after it has read every sample of ``dataset``."""
    batch = max(1, len(dataset) // 100)  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=batch, num_workers=1, collate_fn=_WorkerMemory(),
                        multiprocessing_context="fork")
    last = (0.0, 0.0)
    for last in loader:
        pass
    return last


def memory(root: Path, tiny: Path, cache: Path) -> list[Row]:
    """Growth of a loader worker's memory from a tiny set to the big one: index vs ImageFolder."""
    def indexed(tree: Path) -> Dataset:
        return image_index.IndexedImageFolder(tree / "train", image_index.read_or_scan(tree / "train", cache), len)

    def folder(tree: Path) -> Dataset:
        return datasets.ImageFolder(str(tree / "train"), loader=len)

    grown = {}
    for name, build in (("index", indexed), ("ImageFolder", folder)):
        small = worker_memory(build(tiny))
        big_set = build(root)
        big = worker_memory(big_set)
        grown[name] = (big[0] - small[0], big[1] - small[1], len(big_set))  # type: ignore[arg-type]
        del big_set
    n = grown["index"][2]
    return [
        Row(f"scale: loader worker USS growth, tiny set -> {n} images (index)", "MB", grown["index"][0],
            MEMORY_GOAL_MB, f"goal {MEMORY_GOAL_MB:g} MB", 1.0, False,
            note=f"RSS growth {grown['index'][1]:.1f} MB (index) vs {grown['ImageFolder'][1]:.1f} MB (ImageFolder); "
                 "the worker read every sample's path"),
        Row(f"scale: loader worker USS growth, tiny set -> {n} images", "MB", grown["index"][0],
            max(grown["ImageFolder"][0], 0.01), "ImageFolder", None, False),
    ]


def resident_val_workers(root: Path, cache: Path, workers: int = 2) -> Row:
    """Memory (USS) that validation workers hold after a validation pass, persistent (before) vs now."""
    cfg = config.load([], ["data.source=imagefolder", f"data.root={root}", f"data.cache_dir={cache}",
                           "data.image_size=16", f"data.num_workers={workers}", "data.persistent_workers=true"])
    val = sources.load_splits(cfg.data).val
    cpu = torch.device("cpu")
    now = loaders.build_val_loader(val, cfg.data, 1, 0, cpu, 0)
    dataset = now.dataset
    before = loaders.build_loader(dataset, now.sampler, now.batch_size or 1, cfg.data, cpu, 0, drop_last=False)
    held = {}
    others = {child.pid for child in psutil.Process().children()}  # e.g. a test runner's own children
    for name, loader in (("now", now), ("persistent", before)):
        for _ in loader:
            pass
        children = [child for child in psutil.Process().children() if child.pid not in others]
        held[name] = sum(child.memory_full_info().uss for child in children) / 2**20, len(children)
        del loader
    return Row(f"scale: memory held by validation workers between validations ({workers} workers)", "MB",
               held["now"][0], max(held["persistent"][0], 0.01), "persistent val workers", None, False,
               note=f"{held['now'][1]} vs {held['persistent'][1]} resident worker processes after a validation pass")


# ---------------------------------------------------------------------------------------- main
def measure(workdir: Path, tree: Tree, processes: int) -> list[Row]:
    """Every row of the scale case (the generated tree is kept in ``workdir`` for later runs)."""
    workdir.mkdir(parents=True, exist_ok=True)
    root, tiny = generate(tree, workdir), generate(Tree(classes=2, per_class=2, val_per_class=1), workdir)
    cache = Path(tempfile.mkdtemp(prefix="index-", dir=workdir))  # a cold index cache for the first scan
    try:
        rows = scans(root, cache)
        rows.append(ranked_start(root, cache, processes))
        rows += memory(root, tiny, cache)
        rows.append(resident_val_workers(root, cache))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny tree and 2 ranks, to check that it runs")
    parser.add_argument("--workdir", type=Path, default=Path(os.path.expanduser(config.DataConfig.cache_dir)),
                        help="where the generated trees are kept between runs (default: data.cache_dir's default)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = measure(args.workdir, QUICK if args.quick else FULL, 2 if args.quick else 4)
    print(report.table(rows))
    print(f"({time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
