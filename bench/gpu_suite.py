"""``python -m bench.gpu_suite [--quick] [--out DIR]``: every GPU check in one run, one table.

1. the GPU tests (``pytest -m gpu``) and the fast CPU-safe tests of the training step and meters;
2. throughput on tensors in memory, ``python -m trainer`` vs ``bench/plain_loop.py`` (ResNet-50,
   224 px, bf16, channels_last, batch 256), compile off and on: images/s per epoch, ratio, MFU;
3. real files: a generated ImageFolder of 224 px JPEGs through ``python -m trainer`` with 8 and 15
   loader workers (RandomResizedCrop + flip): images/s, data-wait fraction, per-worker decode rate;
4. NCCL: two processes on one GPU (refused in one line, or run) and one process in a real group;
5. bitwise resume on CUDA with ``train.deterministic=true``: stopped by SIGTERM, resumed, compared;
6. decoding on the device: a folder of photo-sized JPEGs (500x375) through ``python -m trainer`` with
   ``data.decode=gpu`` (and with TrivialAugmentWide), ``data.decode=cpu``, and the same run on tensors
   in memory: steady-state images/s (the first epoch is warm-up), ratio to memory, data wait.

``--quick`` is a dry run on the CPU with tiny sizes: it checks that the script works before the GPU
time is spent. Each result is appended to ``DIR/gpu_results.md`` (and ``.json``) as soon as it is
known, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """How much work each check does: the GPU run, or the CPU dry run."""

    device: str
    model: str
    image_size: int
    batch: int
    steps: int
    warmup: int
    repeats: int
    images: int  # JPEGs in the generated ImageFolder
    loader_workers: tuple[int, ...]
    decode_samples: int
    compile: tuple[bool, ...]  # throughput with torch.compile off and/or on
    photo: tuple[int, int]  # (width, height) of the JPEGs the device-decoding check reads


GPU = Sizes("cuda", "resnet50", 224, 256, 10, 5, 5, 20_000, (8, 15), 800, (False, True), (500, 375))
QUICK = Sizes("cpu", "resnet18", 32, 8, 2, 1, 1, 120, (1, 2), 40, (False,), (64, 48))  # compiling on 2 cores: minutes


class Results:
    """Rows of (check, outcome, details), written out after each one."""

    def __init__(self, out: Path, header: str) -> None:
        self.out, self.rows, self.header = out, [], header
        out.mkdir(parents=True, exist_ok=True)

    def add(self, check: str, outcome: str, **details: Any) -> None:
        self.rows.append({"check": check, "outcome": outcome, **details})
        print(f"[{time.strftime('%H:%M:%S')}] {check}: {outcome} {json.dumps(details)}", flush=True)
        lines = [self.header, "", "| check | outcome | details |", "|---|---|---|"]
        lines += [f"| {r['check']} | {r['outcome']} | "
                  + ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("check", "outcome")) + " |"
                  for r in self.rows]
        (self.out / "gpu_results.md").write_text("\n".join(lines) + "\n")
        (self.out / "gpu_results.json").write_text(json.dumps(self.rows, indent=1))


def child_env(**extra: str) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""), **extra}


def run(cmd: list[str], timeout: float, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=child_env(**extra), capture_output=True, text=True, timeout=timeout)


def tail(text: str, lines: int = 3) -> str:
    return " / ".join(text.strip().splitlines()[-lines:]).replace("|", "/")[:400]


# ----------------------------------------------------------------------------- 1. tests
def check_tests(results: Results, sizes: Sizes, out: Path) -> None:
    suites = {"pytest -m gpu": ["-m", "gpu", "tests/test_gpu.py"],
              "fast CPU-safe tests": ["-m", "not slow", "tests/test_platforms.py", "tests/test_metrics.py"]}
    for name, args in suites.items():
        started = time.monotonic()
        done = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], 600)
        (out / f"pytest_{args[1].replace(' ', '_')}.log").write_text(done.stdout + done.stderr)
        results.add(name, "pass" if done.returncode == 0 else f"FAIL (exit {done.returncode})",
                    summary=tail(done.stdout, 1), seconds=round(time.monotonic() - started))


# ----------------------------------------------------------------------------- 2. throughput
def check_throughput(results: Results, sizes: Sizes, workdir: Path) -> None:
    from bench import throughput
    from bench.versus import Workload

    for compiled in sizes.compile:
        per_class = max(1, sizes.batch * sizes.steps // 10)
        work = Workload(f"memory {sizes.image_size} px, {sizes.model}", sizes.model, sizes.image_size, sizes.batch, 0,
                        10, per_class, epochs=1 + sizes.repeats, device=sizes.device, bf16=True, channels_last=True,
                        compile=compiled)
        started = time.monotonic()
        result = throughput.measure(work, 1, workdir / f"throughput-{compiled}")
        row, worker = result.row, result.runs["worker"][0]
        mfu = [m for m in worker.extra["mfu"][1:] if m is not None]
        results.add(f"throughput {work.describe()}", f"ratio {row.ratio:.3f}",
                    worker_img_s=round(row.worker), plain_img_s=round(row.baseline),
                    epochs_img_s=[round(r) for r in worker.images_per_s], mfu_worker=_pct(mfu[-1] if mfu else None),
                    same_work=result.same_work, seconds=round(time.monotonic() - started))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# ----------------------------------------------------------------------------- 3. real files
def _write_jpegs(job: tuple[Path, int, int, int, int]) -> None:
    from PIL import Image

    folder, first, count, width, height = job
    gen = torch.Generator().manual_seed(first)
    for index in range(first, first + count):
        base = torch.randint(0, 256, (3,), generator=gen)
        noise = torch.randint(0, 64, (height // 8, width // 8, 3), generator=gen)
        pixels = (base + noise).clamp(0, 255).to(torch.uint8).numpy()
        image = Image.fromarray(pixels).resize((width, height), Image.BILINEAR)
        image.save(folder / f"class{index % 10}" / f"{index:06d}.jpg", quality=90)


def make_image_folder(root: Path, count: int, size: int, height: int | None = None) -> Path:
    """``count`` JPEGs (+ a tenth for val) of ``size`` px (or ``size`` x ``height``) in 10 classes,
    written by all cores."""
    for split, n in (("train", count), ("val", max(20, count // 10))):
        for c in range(10):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
        chunk = max(1, n // (4 * (os.cpu_count() or 1)))
        jobs = [(root / split, first, min(chunk, n - first), size, height or size) for first in range(0, n, chunk)]
        with Pool() as pool:
            pool.map(_write_jpegs, jobs)
    return root


def decode_rate(root: Path, sizes: Sizes) -> float:
    """Training images/s that ONE loader worker delivers (decode, RandomResizedCrop, flip, collate)."""
    from torch.utils.data import DataLoader

    from trainer import config
    from trainer.data import loaders, sources

    cfg = config.load([], ["data.source=imagefolder", f"data.root={root}", f"data.image_size={sizes.image_size}",
                           "data.random_resized_crop=true"])
    splits = sources.load_splits(cfg.data)
    dataset = loaders.SeededTransformDataset(splits.train, loaders.build_transform(cfg.data, True), 0, False)
    keys = [(0, i) for i in range(min(sizes.decode_samples, len(splits.train)))]
    loader = DataLoader(dataset, batch_size=32, sampler=keys, num_workers=1, collate_fn=loaders.collate_skipping_bad)
    iterator = iter(loader)
    next(iterator)  # the worker's start-up is not decoding
    started, seen = time.perf_counter(), 0
    for batch in iterator:
        seen += batch[0].shape[0]
    return seen / (time.perf_counter() - started)


def check_real_files(results: Results, sizes: Sizes, workdir: Path) -> None:
    started = time.monotonic()
    root = make_image_folder(workdir / "jpegs", sizes.images, max(sizes.image_size, 256))
    results.add("generate ImageFolder", f"{sizes.images} JPEGs", seconds=round(time.monotonic() - started))
    rate = decode_rate(root, sizes)
    results.add("decode rate per loader worker", f"{rate:.0f} img/s",
                workers_for_3000_img_s=round(3000 / rate, 1))
    for workers in sizes.loader_workers:
        name = f"files-{workers}"
        done = run([sys.executable, "-m", "trainer", "data.source=imagefolder", f"data.root={root}",
                    f"data.image_size={sizes.image_size}", "data.random_resized_crop=true",
                    f"data.batch_size={sizes.batch}", f"data.num_workers={workers}", f"model.name={sizes.model}",
                    "model.channels_last=true", "train.precision=" + ("bf16" if sizes.device == "cuda" else "fp32"),
                    "train.epochs=1", "log.progress_bar=off", f"log.output_dir={workdir / 'runs'}",
                    f"log.name={name}", f"dist.device={sizes.device}", "sched.warmup_epochs=0"], 600)
        if done.returncode != 0:
            results.add(f"Worker on JPEGs, {workers} loader workers", f"FAIL (exit {done.returncode})",
                        stderr=tail(done.stderr))
            continue
        record = json.loads((workdir / "runs" / name / "metrics.jsonl").read_text().splitlines()[-1])
        results.add(f"Worker on JPEGs, {workers} loader workers", f"{record['train/images_per_s']:.0f} img/s",
                    data_wait=f"{100 * record['train/data_wait']:.0f}%",
                    peak_mem_mb=round(record["train/peak_mem_mb"]))


# ----------------------------------------------------------------------------- 4. NCCL
def check_nccl(results: Results, sizes: Sizes, workdir: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    common = ["data.synthetic_train_per_class=64", "data.synthetic_val_per_class=8", "train.epochs=1",
              "log.progress_bar=off", f"log.output_dir={workdir / 'runs'}", f"data.cache_dir={workdir / 'cache'}",
              f"dist.device={sizes.device}"]
    backend = "nccl" if sizes.device == "cuda" else "gloo"
    two = run([*torchrun, "--nproc_per_node=2", "-m", "trainer", *common, "log.name=nccl2"], 300)
    outcome = ("ran" if two.returncode == 0 else
               f"refused, exit {two.returncode}, {len(two.stderr.strip().splitlines())} stderr line(s)")
    ours = [line for line in two.stderr.splitlines() if line.startswith("error")]  # the trainer's own lines
    results.add("2 processes on 1 GPU", outcome, trainer_error=" / ".join(ours) or tail(two.stderr, 2))
    one = run([*torchrun, "--nproc_per_node=1", "-m", "trainer", *common, "log.name=nccl1",
               f"dist.backend={backend}"], 300)
    group = f"({backend})" in one.stdout
    results.add(f"1 process, real {backend} group", "pass" if one.returncode == 0 and group else
                f"FAIL (exit {one.returncode}, group line {'found' if group else 'missing'})",
                stderr=tail(one.stderr, 2))


# ----------------------------------------------------------------------------- 5. deterministic resume
def check_resume(results: Results, sizes: Sizes, workdir: Path) -> None:
    for deterministic in ("true", "false"):
        args = ["model.name=resnet18", "data.synthetic_train_per_class=400", "data.synthetic_val_per_class=20",
                "data.image_size=32", "train.epochs=2", "log.progress_bar=off", f"dist.device={sizes.device}",
                f"train.deterministic={deterministic}", f"log.output_dir={workdir / 'runs'}",
                f"data.cache_dir={workdir / 'cache'}", "log.every_steps=5"]
        whole = run([sys.executable, "-m", "trainer", *args, f"log.name=whole-{deterministic}"], 300)
        name = f"resumed-{deterministic}"
        proc = subprocess.Popen([sys.executable, "-m", "trainer", *args, f"log.name={name}"], cwd=REPO,
                                env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("epoch 1/2"):
                time.sleep(0.5)  # into epoch 2
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.communicate(timeout=300)[0]
        stopped = proc.returncode
        stop_line = next((line for line in rest.splitlines() if "stopped by" in line), "")
        again = run([sys.executable, "-m", "trainer", *args, f"log.name={name}"], 300)
        same = None
        if whole.returncode == again.returncode == 0:
            a = torch.load(workdir / "runs" / f"whole-{deterministic}" / "checkpoints" / "last.pt", weights_only=True)
            b = torch.load(workdir / "runs" / name / "checkpoints" / "last.pt", weights_only=True)
            diffs = [(a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in a["model"]]
            same = f"bitwise={all(d == 0 for d in diffs)}, max_abs_diff={max(diffs):.2e}"
        results.add(f"resume after SIGTERM, deterministic={deterministic}",
                    same or f"FAIL (exits {whole.returncode}/{stopped}/{again.returncode})",
                    stop_exit=stopped, stop_line=tail(stop_line, 1))


# ----------------------------------------------------------------------------- 6. decoding on the device
def check_device_decode(results: Results, sizes: Sizes, workdir: Path) -> None:
    """The JPEG-folder rate with ``data.decode=gpu`` against the in-memory rate of the same run (the
    issue's bar: >= 0.9x, data wait < 5%), with and without TrivialAugmentWide, and the CPU decode."""
    from bench.versus import Workload, run_worker, user_environment

    started = time.monotonic()
    width, height = sizes.photo
    root = make_image_folder(workdir / "photos", sizes.images, width, height)
    results.add("generate photo-sized ImageFolder", f"{sizes.images} JPEGs of {width}x{height}",
                seconds=round(time.monotonic() - started))
    workers, classes = sizes.loader_workers[0], 10
    common: dict[str, Any] = dict(model=sizes.model, image_size=sizes.image_size, batch=sizes.batch,
                                  workers=workers, classes=classes, train_per_class=sizes.images // classes,
                                  epochs=3, device=sizes.device, bf16=sizes.device == "cuda", channels_last=True)
    trivial = "data.auto_augment=trivialaugment"
    runs = {"tensors in memory": Workload("memory", data=None, **common),
            "JPEGs, data.decode=gpu": Workload("decode gpu", data=root, extra=("data.decode=gpu",), **common),
            "JPEGs, data.decode=gpu, TrivialAugmentWide": Workload("decode gpu trivialaugment", data=root,
                                                                   extra=("data.decode=gpu", trivial), **common),
            "JPEGs, data.decode=cpu": Workload("decode cpu", data=root, extra=("data.decode=cpu",), **common)}
    memory = None
    for name, work in runs.items():
        try:
            run_ = run_worker(work, 1, workdir, work.label.replace(" ", "-"), user_environment())
        except Exception as exc:  # one failed run must not cost the others
            results.add(f"{name}, {workers} loader workers", f"FAIL {type(exc).__name__}",
                        message=str(exc).splitlines()[0][:300])
            continue
        memory = memory or (run_.rate if work.data is None else None)
        waits = [w for w in run_.extra["data_wait"][1:] if w is not None]
        results.add(f"{name}, {workers} loader workers, steady state", f"{run_.rate:.0f} img/s",
                    ratio_to_memory=round(run_.rate / memory, 3) if memory else "-",
                    data_wait=_pct(max(waits) if waits else None), epochs_img_s=[round(r) for r in run_.images_per_s])


CHECKS = {"tests": check_tests, "throughput": check_throughput, "files": check_real_files, "nccl": check_nccl,
          "resume": check_resume, "decode": check_device_decode}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a dry run on the CPU with tiny sizes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-results")))
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"subset of {','.join(CHECKS)}")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else GPU
    if sizes.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu_suite: no CUDA device visible; use --quick for the CPU dry run", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name() if sizes.device == "cuda" else "CPU dry run"
    header = (f"GPU suite {time.strftime('%Y-%m-%d %H:%M')} on {device}, torch {torch.__version__}, "
              f"{os.cpu_count()} cores")
    results = Results(args.out, header)
    print(header, flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        for name in args.checks.split(","):
            started = time.monotonic()
            try:
                CHECKS[name](results, sizes, Path(tmp) if name != "tests" else args.out)
            except Exception as exc:  # one failed check must not cost the others their device time
                results.add(name, f"ERROR {type(exc).__name__}", message=str(exc).splitlines()[0][:300])
            print(f"--- {name} took {time.monotonic() - started:.0f} s", flush=True)
    print("\n" + (args.out / "gpu_results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
