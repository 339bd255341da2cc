"""Time from process start to the first finished training step: ``python -m trainer`` vs a plain script.

Both sides are fresh child processes, spawned alternately ``repeats`` times each, reading the same
synthetic image folder (generated beforehand) through a DataLoader with the same workers.

* Start point: the parent's ``time.time()`` immediately before ``subprocess.Popen``.
* End point: the parent's ``time.time()`` when the child's line saying that its first
  ``optimizer.step()`` returned arrives: ``python -m trainer``'s own log line ("first optimizer
  step done ..."), the script's ``MARK first_step``. The Worker is then stopped.

Each side's earlier lines mark phases the same way (``built``: data sets, model and optimizer
ready, the Worker's "run ..." line), so the report can say which phase costs what.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import Row, interleave, median, paired_ratios
from bench.versus import user_environment
from trainer import config
from trainer.data import sources

REPO = Path(__file__).resolve().parents[1]
PHASES = ("python_up", "imports", "built", "first_step")
WORKER_MARKS = {"run ": "built", "first optimizer step done": "first_step"}
"""Start of a ``python -m trainer`` console line -> the phase it marks."""


@dataclass
class Startup:
    """The result of :func:`measure`: the table row plus each side's phase marks (seconds after spawn)."""

    row: Row
    marks: dict[str, dict[str, list[float]]]


def measure(workdir: Path, repeats: int, workers: int = 2, goal: float = 1.1) -> Startup:
    """Spawn ``python -m trainer`` (probed) and the plain script alternately; median seconds to the first step.

    Model ``linear`` on 16 px images, batch 16, 10 classes.
    """
    model, image_size, batch, classes = "linear", 16, 16, 10
    overrides = [  # spelled out where bench/startup_plain.py hard-codes the same values
        f"model.name={model}", f"data.image_size={image_size}", f"data.batch_size={batch}",
        f"data.synthetic_classes={classes}", "data.synthetic_train_per_class=100",
        "data.synthetic_val_per_class=20", f"data.num_workers={workers}", "data.random_resized_crop=true",
        "data.crop_scale_min=0.35", "data.hflip=true", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
        "optim.lr=0.05", "optim.lr_base_batch=0", "optim.momentum=0.9", "optim.nesterov=true",
        "optim.weight_decay=0.0005", "train.label_smoothing=0.1", f"data.cache_dir={workdir / 'cache'}",
        f"log.output_dir={workdir / 'runs'}", "log.progress_bar=on", "dist.device=cpu", "train.precision=fp32"]
    root = _prepare_data(overrides)
    counter = iter(range(10 ** 6))
    marks: dict[str, dict[str, list[float]]] = {"worker": {}, "hand-written": {}}
    commands = {
        "worker": lambda: [sys.executable, "-m", "trainer", *overrides, f"log.name=startup-{next(counter)}"],
        "hand-written": lambda: [sys.executable, "-m", "bench.startup_plain", str(root), str(image_size),
                                 str(batch), str(workers)],
    }
    runs = {side: (lambda side=side: _spawn(commands[side](), marks[side])) for side in commands}
    seconds = interleave(runs, repeats)
    row = Row(f"start-up to first step: python -m trainer vs plain script ({model}, {workers} loader workers)",
              "s", median(seconds["worker"]), median(seconds["hand-written"]), "plain script", goal, False,
              paired_ratios(seconds["worker"], seconds["hand-written"]),
              note="start = the parent's time.time() just before Popen; end = when the child's line saying its "
                   "first optimizer.step() returned reaches the parent")
    return Startup(row, marks)


def _prepare_data(overrides: list[str]) -> Path:
    """Generate the synthetic image folder once, outside the timing; return its train/ folder."""
    cfg = config.load([], overrides)
    sources.prepare(cfg.data)
    return Path(sources.load_splits(cfg.data).train.root)  # type: ignore[attr-defined]


def _spawn(cmd: list[str], marks: dict[str, list[float]]) -> float:
    """Run one child until its first step; record its phases in seconds after the spawn; return the first step's."""
    errors = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while the child runs
    spawned = time.time()
    child = subprocess.Popen(cmd, cwd=REPO, env=user_environment(), stdout=subprocess.PIPE, stderr=errors,
                             text=True, start_new_session=True)
    found: dict[str, float] = {}
    try:
        assert child.stdout is not None
        for line in child.stdout:
            phase = _phase(line)
            if phase is not None:
                found.setdefault(phase, time.time() - spawned)
            if "first_step" in found:
                break
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)  # the Worker would train on; its loader workers go too
        child.communicate(timeout=60)
    if "first_step" not in found:
        errors.seek(0)
        raise RuntimeError(f"{' '.join(cmd[:3])} ended without a training step (exit {child.returncode}):\n"
                           f"{errors.read()[-3000:]}")
    errors.close()
    for name, value in found.items():
        marks.setdefault(name, []).append(value)
    return found["first_step"]


def _phase(line: str) -> str | None:
    """The phase a child's output line marks: the script's ``MARK <phase> ...``, the Worker's log lines."""
    if line.startswith("MARK "):
        return line.split()[1]
    return next((phase for start, phase in WORKER_MARKS.items() if line.startswith(start)), None)
