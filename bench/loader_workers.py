"""``python -m bench.loader_workers``: JPEG batches a training process receives, by loader worker count.

The main process stands in for one that feeds a GPU: for each batch it runs a fixed step of
``--step-ms`` of CPU time in one Python thread (as a training step launching kernels does), then
asks for the next batch. Per worker count, two sides, each run in a fresh process, interleaved:

* plain: a user's script: torchvision ``ImageFolder``, ``RandomResizedCrop`` + flip +
  ``PILToTensor``, ``DataLoader(num_workers=W, shuffle=True)`` with PyTorch's defaults;
* trainer: the same decoding through ``trainer.data`` (per-sample seeded transforms,
  ``data.jpeg_draft=false`` so both decode as much), with its prefetch per worker, and with
  ``auto`` the count and main-process threads that ``data.num_workers=auto`` picks for a GPU process.

Reported: images/s in steady state (after the first batch of every worker), and the step's
stretch (its wall time over its CPU time): above 1, the main process waited for a core the
workers held. The JPEGs are ``bench/photos.py``'s photo-like set (300-480 px).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import photos
from bench.common import Row, interleave, median, paired_ratios

REPO = Path(__file__).resolve().parents[1]
SIDES = ("plain", "trainer")


@dataclass(frozen=True)
class Plan:
    workers: tuple[str, ...] = ("1", "2", "3", "auto")
    """Worker counts; ``auto`` runs the plain side with the count the trainer side chose."""
    rounds: int = 3
    batch: int = 16
    batches: int = 24
    """Timed batches per run, after the warm-up (one batch per worker)."""
    step_ms: float = 30.0
    photos: photos.PhotoSet = photos.PhotoSet(classes=4, train_per_class=48, val_per_class=1)


QUICK = Plan(workers=("1", "auto"), rounds=1, batch=4, batches=4,
             photos=photos.PhotoSet(classes=2, train_per_class=8, val_per_class=1, min_side=64, max_side=96))


@dataclass
class Result:
    rows: list[Row] = field(default_factory=list)
    runs: dict[str, dict[str, list[dict]]] = field(default_factory=dict)


def measure(plan: Plan, cache_dir: Path) -> Result:
    """Interleaved rounds of both sides per worker count; one row per count (images/s, trainer / plain)."""
    root = photos.ensure(plan.photos, cache_dir)
    result = Result()
    for workers in plan.workers:
        runs = interleave({side: lambda side=side: _child(side, workers, root, plan) for side in SIDES}, plan.rounds)
        result.runs[workers] = runs
        ours, plain = ([run["images_per_s"] for run in runs[side]] for side in ("trainer", "plain"))
        chosen = runs["trainer"][0]["workers"]
        stretch = {side: median([run["stretch"] for run in runs[side]]) for side in SIDES}
        result.rows.append(Row(
            "loader_workers", f"img/s, {workers if workers != 'auto' else f'auto={chosen}'} worker(s)",
            median(ours), median(plain), "plain DataLoader", None, True, paired_ratios(ours, plain),
            f"step stretch trainer {stretch['trainer']:.2f}, plain {stretch['plain']:.2f}; "
            f"main threads trainer {runs['trainer'][0]['threads']}, plain {runs['plain'][0]['threads']}"))
    return result


def _child(side: str, workers: str, root: Path, plan: Plan) -> dict:
    args = [sys.executable, "-m", "bench.loader_workers", "--child", side, "--workers", workers, "--root", str(root),
            "--batch", str(plan.batch), "--batches", str(plan.batches), "--step-ms", str(plan.step_ms)]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"bench.loader_workers {side} {workers}: exit {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def step(seconds: float) -> float:
    """Spin in Python for ``seconds`` of this thread's CPU time; the wall seconds it took."""
    started, cpu = time.perf_counter(), time.thread_time()
    while time.thread_time() - cpu < seconds:
        sum(range(200))
    return time.perf_counter() - started


def consume(loader, warmup: int, batches: int, step_s: float) -> dict:
    """Images/s over ``batches`` batches after ``warmup``, and the mean stretch of the fixed step."""
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    started, images, stretch = time.perf_counter(), 0, 0.0
    for _ in range(batches):
        batch = next(iterator)
        images += len(batch[0])
        stretch += step(step_s) / step_s
    return {"images_per_s": images / (time.perf_counter() - started), "stretch": stretch / batches}


def _repeated(base, count: int):
    from torch.utils.data import ConcatDataset

    return ConcatDataset([base] * max(1, -(-count // len(base))))


def _plain(workers: int, root: Path, args: argparse.Namespace) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                    transforms.PILToTensor()])
    needed = (workers + args.batches) * args.batch
    loader = DataLoader(_repeated(datasets.ImageFolder(str(root / "train"), transform), needed),
                        batch_size=args.batch, shuffle=True, num_workers=workers, drop_last=True)
    return {**consume(loader, workers, args.batches, args.step_ms / 1000), "workers": workers,
            "threads": torch.get_num_threads()}


def _trainer(asked: str, root: Path, args: argparse.Namespace) -> dict:
    import torch
    from torchvision import datasets

    from trainer import config
    from trainer.data import loaders, workers as worker_plans

    plan = worker_plans.plan(asked if asked == "auto" else int(asked), "cuda")  # stands in for a GPU process
    if plan.main_threads:
        torch.set_num_threads(plan.main_threads)
    cfg = config.load([], ["data.source=imagefolder", f"data.root={root}", "data.image_size=224",
                           "data.random_resized_crop=true", "data.jpeg_draft=false", f"data.batch_size={args.batch}",
                           f"data.num_workers={plan.workers}"]).data
    base = _repeated(datasets.ImageFolder(str(root / "train")), (plan.workers + args.batches) * args.batch)
    dataset = loaders.SeededTransformDataset(base, loaders.build_transform(cfg, True), 0)
    sampler = loaders.TrainBatchSampler(len(dataset), 1, 0, args.batch, 0)
    loader = loaders.build_train_loader(dataset, sampler, cfg, torch.device("cpu"), 0)
    return {**consume(loader, plan.workers, args.batches, args.step_ms / 1000), "workers": plan.workers,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loader_workers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: checks that everything works")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/launchpad").expanduser())
    parser.add_argument("--workers", help="comma-separated worker counts (default 1,2,3,auto)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--step-ms", type=float)
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child == "plain":
            chosen = args.workers if args.workers != "auto" else _trainer_choice()
            print(json.dumps(_plain(int(chosen), args.root, args)))
        else:
            print(json.dumps(_trainer(args.workers, args.root, args)))
        return 0
    plan = QUICK if args.quick else Plan()
    overrides = {"workers": tuple(args.workers.split(",")) if args.workers else None, "rounds": args.rounds,
                 "step_ms": args.step_ms}
    plan = Plan(**{**plan.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    from bench import report

    result = measure(plan, args.cache_dir)
    print(report.table(result.rows))
    return 0


def _trainer_choice() -> str:
    """The count ``data.num_workers=auto`` picks here for a GPU process, asked of a child that imports the trainer."""
    code = "from trainer.data import workers; print(workers.plan('auto', 'cuda').workers)"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
