"""End to end on image files: ``python -m trainer`` vs the tutorial loop (``bench/plain_loop.py``).

Two data sets, each run on 1 process and on 2 gloo processes (torchrun on both sides):

* JPEG: a photo-like ImageFolder (a few hundred pixels per side, bench/photos.py) cropped to 224 px;
* PNG: the built-in synthetic set of 64 px PNGs (what ``data.source=synthetic`` writes), 960 per
  epoch: 15 steps, as epochs of a few steps time their edges more than their steps.

Same data, RandomResizedCrop + flip + ToTensor + Normalize, DataLoader workers, batch, model, SGD
and fp32 on both sides; each round runs one Worker job and one script job back to back (order
rotating), and the ratio is the Worker's training images/s over the script's, epochs after the
first. Data sets are generated once into ``--cache-dir`` and reused.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import Row, median, paired_ratios
from bench.photos import PhotoSet, ensure
from bench.versus import Comparison, Workload, compare, rates, run_plain, run_worker, user_environment
from trainer import config
from trainer.data import sources


def workloads(cache_dir: Path, quick: bool) -> list[Workload]:
    """The JPEG and the PNG workload (tiny ones with ``quick``: a smoke test, not a measurement)."""
    if quick:
        photos = ensure(PhotoSet(classes=2, train_per_class=8, val_per_class=1, min_side=48, max_side=64), cache_dir)
        return [Workload("jpeg 48-64 px -> 32 px, linear", "linear", 32, 4, 1, 2, 8, photos, epochs=2),
                Workload("png 16 px, linear", "linear", 16, 4, 1, 2, 8, synthetic_png(cache_dir, 2, 8, 16), epochs=2)]
    photos = ensure(PhotoSet(train_per_class=32), cache_dir)
    return [Workload("jpeg 300-480 px -> 224 px, mobilenet_v3_small", "mobilenet_v3_small", 224, 32, 2,
                     10, 32, photos),
            Workload("png 64 px, resnet18", "resnet18", 64, 64, 2, 10, 96, synthetic_png(cache_dir, 10, 96, 64))]


def synthetic_png(cache_dir: Path, classes: int, per_class: int, size: int) -> Path:
    """The built-in synthetic ImageFolder (train/ and val/ of PNGs), generated once."""
    cfg = config.load([], [f"data.synthetic_classes={classes}", f"data.synthetic_train_per_class={per_class}",
                           "data.synthetic_val_per_class=2", f"data.image_size={size}", f"data.cache_dir={cache_dir}"])
    sources.prepare(cfg.data)
    return Path(sources.load_splits(cfg.data).train.root).parent  # type: ignore[attr-defined]


def measure(work: Workload, nproc: int, rounds: int, workdir: Path, goal: float = 0.99) -> Comparison:
    """``rounds`` interleaved rounds of one Worker job and one script job on ``nproc`` processes."""
    env = user_environment()
    runs = compare({"worker": lambda: run_worker(work, nproc, workdir, f"files-{nproc}p", env),
                    "hand-written": lambda: run_plain(work, nproc, env)}, rounds)
    rate = rates(runs)
    where = f"{nproc} processes (torchrun, gloo)" if nproc > 1 else "1 process"
    row = Row(f"files: {work.describe()}, {where}", "images/s", median(rate["worker"]), median(rate["hand-written"]),
              "hand-written", goal, True, paired_ratios(rate["worker"], rate["hand-written"]))
    return Comparison(row, runs)

