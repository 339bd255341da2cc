"""The Worker (``python -m trainer``) against ``bench/plain_loop.py``, each a fresh child process.

Both sides run as a user would start them, from the user's environment (``OMP_WAIT_POLICY`` as
it was before ``trainer`` was imported here), under plain ``python`` for 1 process and under
``torchrun --standalone`` for several. Each run trains a few epochs; the first is warm-up (loader
workers starting, first allocations) and the rest are timed: the Worker's per-epoch
``train/images_per_s`` from its ``metrics.jsonl``, the script's own per-epoch images/s, both timed
from asking the loader for the first batch to the end of the last step.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.common import Row, interleave, median
from trainer.parallel import openmp

REPO = Path(__file__).resolve().parents[1]
PLAIN_SCRIPT = Path(__file__).resolve().with_name("plain_loop.py")
PLAIN_MARKER = "PLAIN_RESULT "
TIMEOUT_S = 1800
RUN_NUMBERS = itertools.count()


@dataclass(frozen=True)
class Workload:
    """One training job, identical on both sides; ``data`` is an ImageFolder root (with train/
    and val/) or None for random tensors in memory (``bench/memory.py``)."""

    label: str
    model: str
    image_size: int
    batch: int  # per process
    workers: int  # DataLoader workers per process
    classes: int
    train_per_class: int
    data: Path | None = None
    epochs: int = 3  # the first is warm-up
    lr: float = 0.1
    device: str = "cpu"
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    extra: tuple[str, ...] = ()  # further Worker overrides that change nothing the script does

    def describe(self) -> str:
        options = [f"batch {self.batch}", f"{self.workers} loader workers", "bf16" if self.bf16 else "fp32"]
        options += ["channels_last"] * self.channels_last + ["compiled"] * self.compile
        return f"{self.label}, {', '.join(options)}, {self.device}"

    def worker_overrides(self) -> list[str]:
        source = (["data.source=imagefolder", f"data.root={self.data}"] if self.data is not None else
                  ["data.source=bench.memory:build", f"data.synthetic_classes={self.classes}",
                   f"data.synthetic_train_per_class={self.train_per_class}", "data.synthetic_val_per_class=1"])
        return [*source, f"model.name={self.model}", f"data.image_size={self.image_size}",
                f"data.batch_size={self.batch}", f"data.num_workers={self.workers}",
                "data.random_resized_crop=true", "data.crop_scale_min=0.35", "data.hflip=true",
                "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", f"dist.device={self.device}",
                f"train.precision={'bf16' if self.bf16 else 'fp32'}",
                f"model.channels_last={str(self.channels_last).lower()}", f"model.compile={str(self.compile).lower()}",
                "train.label_smoothing=0", f"optim.lr={self.lr}", "optim.lr_base_batch=0", "optim.momentum=0.9",
                "optim.nesterov=true", "optim.weight_decay=0.0005", "sched.name=constant", "sched.warmup_epochs=0",
                f"train.epochs={self.epochs}", "log.trackers=[jsonl]", "log.pictures=false", "log.progress_bar=off",
                "ckpt.resume=never", *self.extra]

    def plain_args(self) -> list[str]:
        data = [str(self.data / "train")] if self.data is not None else [
            "--memory", str(self.classes), str(self.train_per_class)]
        return [*data, "--model", self.model, "--image-size", str(self.image_size), "--batch", str(self.batch),
                "--workers", str(self.workers), "--epochs", str(self.epochs), "--lr", str(self.lr),
                "--crop-scale-min", "0.35", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25",
                "--device", self.device, *["--bf16"] * self.bf16, *["--channels-last"] * self.channels_last,
                *["--compile"] * self.compile]


@dataclass
class Run:
    """One child run: per-epoch training images/s (all processes), what it trained, and on how many."""

    images_per_s: list[float]
    model: str
    parameters: int
    samples_per_epoch: int
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """The median of the timed epochs' images/s (every epoch but the first)."""
        return median(self.images_per_s[1:] or self.images_per_s)


@dataclass
class Comparison:
    """One row of the table and every run behind it, per side."""

    row: Row
    runs: dict[str, list[Run]]

    @property
    def same_work(self) -> dict[str, list[tuple[str, int, int]]]:
        """(model, parameters, samples per epoch) of every run, per side: one value if both sides agree."""
        return {side: sorted({(r.model, r.parameters, r.samples_per_epoch) for r in runs})
                for side, runs in self.runs.items()}


def user_environment(**overrides: str) -> dict[str, str]:
    """The environment a user's shell gave this process (``OMP_WAIT_POLICY`` as before ``trainer``
    chose one), with ``PYTHONPATH`` reaching this checkout, plus ``overrides``."""
    env = openmp.user_environment()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(overrides)
    return env


def launcher(nproc: int) -> list[str]:
    """``python`` for one process, ``torchrun --standalone`` (its module form) for several."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def run_worker(work: Workload, nproc: int, workdir: Path, prefix: str, env: dict[str, str]) -> Run:
    """``python -m trainer`` (or ``torchrun -m trainer``) on ``work`` in a new run directory; read
    its metrics.jsonl."""
    name = f"{prefix}-{next(RUN_NUMBERS)}"
    cmd = [*launcher(nproc), "-m", "trainer", *work.worker_overrides(), f"log.output_dir={workdir / 'runs'}",
           f"log.name={name}", f"data.cache_dir={workdir / 'cache'}"]
    done = _run(cmd, env)
    lines = (workdir / "runs" / name / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines]
    started = re.search(r"model (\S+), ([\d,]+) parameters.*?(\d+) train / \d+ val samples", done.stderr + done.stdout)
    if started is None:
        raise RuntimeError(f"{' '.join(cmd[:8])}...: no start-up line in its log:\n{done.stderr[-2000:]}")
    return Run([e["train/images_per_s"] for e in epochs], started.group(1), int(started.group(2).replace(",", "")),
               int(started.group(3)), {key: [e.get(f"train/{key}") for e in epochs] for key in ("data_wait", "mfu")})


def run_plain(work: Workload, nproc: int, env: dict[str, str]) -> Run:
    """``bench/plain_loop.py`` (by path, as a user's script) on ``work``."""
    done = _run([*launcher(nproc), str(PLAIN_SCRIPT), *work.plain_args()], env)
    found = [line for line in done.stdout.splitlines() if line.startswith(PLAIN_MARKER)]
    if not found:
        raise RuntimeError(f"{PLAIN_SCRIPT.name}: no result line:\n{done.stderr[-2000:]}")
    result = json.loads(found[-1][len(PLAIN_MARKER):])
    return Run(result["images_per_s"], result["model"], result["parameters"], result["samples_per_epoch"],
               {key: result[key] for key in ("threads", "omp_wait_policy", "root")})


def compare(sides: dict[str, Callable[[], Run]], rounds: int) -> dict[str, list[Run]]:
    """``rounds`` rounds of every side's run, back to back, the order rotating each round."""
    return interleave(sides, rounds)


def rates(runs: dict[str, list[Run]]) -> dict[str, list[float]]:
    """Each side's timed images/s, one per round."""
    return {side: [run.rate for run in values] for side, values in runs.items()}


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])}... failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return done
