"""``python -m bench.decode [--quick]``: images/s per core (one loader worker, one thread), per decode path.

The work of a DataLoader worker, done in this process with one torch thread (as in a worker, so
its rate is the rate of one core): read a 224 px training sample (random resized crop +
horizontal flip, seeded per sample as ``loaders.SeededTransformDataset`` does) and collate
batches of 32. The paths, interleaved round by round:

* tutorial: ImageFolder's PIL loader on the original photos, RandomResizedCrop,
  RandomHorizontalFlip, ToTensor, Normalize (float32 out) -- the baseline;
* the same with uint8 out (PILToTensor);
* torchvision.io: ``decode_jpeg`` (libjpeg-turbo) into a tensor, then the tensor transforms;
* the trainer's transform (``loaders.build_transform``, uint8 out) without and with reduced-size
  JPEG decoding (``data.jpeg_draft``): today's Worker path on the original photos;
* prepared shards: the same photos through ``python -m trainer.prepare --short-side 256`` (done
  once, before the clock), read by ``data.source=prepared`` with the trainer's transform.

The JPEGs look like photos rather than flat colour (decode time depends on the content): the
built-in shapes upscaled to ImageNet-like sizes (375-500 px on the short side) with textured
noise, quality 90.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from bench import report
from bench.common import Row, Timing, clock, interleave, median, paired_ratios, since
from trainer import config
from trainer.data import loaders, shards, sources
from trainer.data.synthetic import SyntheticSpec, ensure_synthetic_dataset
from trainer.parallel import openmp
from trainer.tools import prepare

BATCH = 32
TARGET_RATE = 3000.0
"""Images/s a fast GPU trains ResNet-50 at: how many loader workers feed it."""
BASELINE = "tutorial"
TRAINER = "trainer (PIL draft, uint8)"
PREPARED_SIDE = 256
PREPARED = f"prepared shards, --short-side {PREPARED_SIDE} (trainer, uint8)"
GOALS = {TRAINER: 1.3, PREPARED: 3.0}
"""Images/s per core vs the tutorial pipeline on the original photos."""
UNIT = "img/s per core (1 worker, 1 thread)"


@dataclass(frozen=True)
class Plan:
    images: int = 96  # JPEGs each path loads per round
    repeats: int = 9  # interleaved rounds
    image_size: int = 224  # the training crop's side


@dataclass
class Decode:
    """The rows (each path vs the tutorial pipeline) and every round's images/s, wall and CPU time."""

    rows: list[Row]
    images: int
    image_size: int
    crop_scale_min: float
    rates: dict[str, list[float]]
    cpu_rates: dict[str, list[float]]
    batches: dict[str, tuple[str, list[int]]]  # dtype and shape of each path's first batch


def make_photo_folder(root: Path, count: int, seed: int = 0) -> Path:
    """``root/photos/train/<class>/*.jpg``: ``count`` photo-like JPEGs; returns the train folder."""
    shapes = ensure_synthetic_dataset(root / "shapes", SyntheticSpec(num_classes=4, train_per_class=math.ceil(count / 4),
                                                                      val_per_class=1, image_size=64, seed=seed))
    rng = np.random.default_rng(seed)
    train = root / "photos" / "train"
    sources = sorted((shapes / "train").rglob("*.png"))[:count]
    for path in sources:
        short = int(rng.integers(375, 501))
        long = int(short * rng.choice([4 / 3, 3 / 2]))
        width, height = (long, short) if rng.random() < 0.7 else (short, long)
        pixels = np.asarray(Image.open(path).convert("RGB").resize((width, height), Image.Resampling.BICUBIC),
                            dtype=np.float32)
        pixels = pixels + _texture(rng, height, width)
        folder = train / path.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{path.stem}.jpg", quality=90)
    (train.parent / "val").symlink_to("train")  # the trainer's data source wants both splits
    return train


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Noise at several scales, per channel: smooth shading, mid-size texture and fine grain."""
    total = np.zeros((height, width, 3), dtype=np.float32)
    for cells, strength in ((8, 24.0), (48, 14.0), (0, 6.0)):
        if cells == 0:
            total += rng.normal(0, strength, (height, width, 3)).astype(np.float32)
            continue
        coarse = rng.normal(0, strength, (cells * height // width + 1, cells, 3))
        for channel in range(3):
            layer = Image.fromarray(coarse[..., channel].astype(np.float32), mode="F")
            total[..., channel] += np.asarray(layer.resize((width, height), Image.Resampling.BICUBIC))
    return total


class _TensorDecode:
    """torchvision.io: the file's bytes decoded into a uint8 tensor, then the tensor transforms."""

    def __init__(self, size: int, scale: tuple[float, float]) -> None:
        self.steps = transforms.Compose([transforms.RandomResizedCrop(size, scale=scale, antialias=True),
                                         transforms.RandomHorizontalFlip()])

    def __call__(self, path: str) -> torch.Tensor:
        return self.steps(decode_jpeg(read_file(path), mode=ImageReadMode.RGB))


def paths(train: Path, size: int, scale_min: float) -> dict[str, Dataset]:
    """Each decode path as a per-sample-seeded data set of the same photos (prepared once into
    shards beside ``train``'s folder for the last)."""
    cfg = config.load([], ["data.source=imagefolder", f"data.root={train.parent}", f"data.image_size={size}",
                           "data.random_resized_crop=true", f"data.crop_scale_min={scale_min}"]).data
    crop_flip = [transforms.RandomResizedCrop(size, scale=(scale_min, 1.0), antialias=True),
                 transforms.RandomHorizontalFlip()]
    tutorial = transforms.Compose([*crop_flip, transforms.ToTensor(), transforms.Normalize(cfg.mean, cfg.std)])
    pil_uint8 = transforms.Compose([*crop_flip, transforms.PILToTensor()])
    plain_folder = datasets.ImageFolder(str(train))  # torchvision's loader: decodes the whole image
    files = datasets.ImageFolder(str(train), loader=str)
    trainer_set = sources.load_splits(cfg).train
    no_draft = config.load([], ["data.random_resized_crop=true", f"data.image_size={size}",
                                f"data.crop_scale_min={scale_min}", "data.jpeg_draft=false"]).data
    return {
        BASELINE: loaders.SeededTransformDataset(plain_folder, tutorial, seed=0),
        "PIL, uint8": loaders.SeededTransformDataset(plain_folder, pil_uint8, seed=0),
        "torchvision.io decode_jpeg, uint8": loaders.SeededTransformDataset(files, _TensorDecode(size, (scale_min, 1.0)),
                                                                        seed=0),
        "trainer, jpeg_draft=false (uint8)": loaders.SeededTransformDataset(trainer_set, loaders.build_transform(no_draft, True),
                                                                         seed=0),
        TRAINER: loaders.SeededTransformDataset(trainer_set, loaders.build_transform(cfg, True), seed=0),
        PREPARED: loaders.SeededTransformDataset(_prepared(train), loaders.build_transform(cfg, True), seed=0),
    }


def _prepared(train: Path) -> Dataset:
    """The photo folder through ``python -m trainer.prepare --short-side 256``: its training split."""
    folder = train.parent.with_name(f"photos-prepared-{PREPARED_SIDE}")
    prepare.prepare(train.parent, folder, prepare.Options(PREPARED_SIDE, workers=openmp.usable_cores()),
                    say=lambda line: None)
    return shards.load_splits(folder)[0]


def worker_pass(dataset: Dataset, epoch: int, count: int) -> tuple[Timing, list[torch.Tensor]]:
    """One worker's work for ``count`` samples of ``epoch``: load, transform, collate batches."""
    started, batches = clock(), []
    for first in range(0, count, BATCH):
        batch = [dataset[(epoch, index)] for index in range(first, min(first + BATCH, count))]
        batches.append(loaders.collate_skipping_bad(batch)[0])
    return since(started), batches


def measure(workdir: Path, plan: Plan, scale_min: float = 0.08) -> Decode:
    """Interleaved rounds of every path; one row per path against the tutorial pipeline."""
    train = make_photo_folder(workdir, plan.images)
    datasets_ = paths(train, plan.image_size, scale_min)
    count = min(plan.images, len(datasets_[BASELINE]))  # type: ignore[arg-type]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    passes = {name: 0 for name in datasets_}  # a path's n-th pass reads epoch n: the same crops for every path
    shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}

    def runner(name: str) -> Callable[[], Timing]:
        def run() -> Timing:
            timing, batches = worker_pass(datasets_[name], passes[name], count)
            passes[name] += 1
            shapes[name] = (batches[0].dtype, tuple(batches[0].shape))
            return timing
        return run

    try:
        timings = interleave({name: runner(name) for name in datasets_}, plan.repeats)
    finally:
        torch.set_num_threads(threads)
    rates = {name: [count / t.wall for t in values] for name, values in timings.items()}
    cpu_rates = {name: [count / t.cpu for t in values] for name, values in timings.items()}
    rows = []
    for name in datasets_:
        if name == BASELINE:
            continue
        ours, tutorial = median(cpu_rates[name]), median(cpu_rates[BASELINE])
        note = f"CPU-time ratio {ours / tutorial:.3f}"
        if name in GOALS:  # a worker with a core of its own runs at its CPU-time rate
            note += (f"; {ours:.0f} img/s per core (CPU time; {median(rates[name]):.0f} wall), so "
                     f"{math.ceil(TARGET_RATE / ours)} loader workers for {TARGET_RATE:.0f} img/s; "
                     f"tutorial {tutorial:.0f} img/s per core, {math.ceil(TARGET_RATE / tutorial)} workers")
        rows.append(Row(f"decode: {name}", UNIT, median(rates[name]), median(rates[BASELINE]),
                        BASELINE, GOALS.get(name), True, paired_ratios(rates[name], rates[BASELINE]), note))
    return Decode(rows, count, plan.image_size, scale_min, rates, cpu_rates,
                  {name: (str(dtype), list(shape)) for name, (dtype, shape) in shapes.items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few images, two rounds: check that it runs")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default 9)")
    parser.add_argument("--images", type=int, help="JPEGs decoded per path per round (default 96)")
    parser.add_argument("--image-size", type=int, help="side of the training crop (default 224)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every sample as JSON")
    args = parser.parse_args(argv)
    plan = Plan(images=8, repeats=2) if args.quick else Plan()
    plan = Plan(args.images or plan.images, args.repeats or plan.repeats, args.image_size or plan.image_size)
    meta = report.machine()
    print(f"bench.decode {meta['date']}: {meta['cpu']} ({meta['cores']} cores), torch {meta['torch']}, "
          f"load average {meta['load_average_start'][0]:.1f}; {plan.images} JPEGs x {plan.repeats} rounds, {plan.image_size} px crops", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    try:
        result = measure(workdir, plan)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta["load_average_end"] = os.getloadavg()
    print(f"load average at end {meta['load_average_end'][0]:.1f}\n")
    print(report.table(result.rows))
    if args.json:
        report.to_json(args.json, meta, result.rows, {"decode": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
