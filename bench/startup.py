"""Time from process start to the first finished training step: ``python -m trainer`` vs a plain script.

Both sides are fresh child processes, spawned alternately ``repeats`` times each, reading the same
synthetic image folder (generated beforehand) through a DataLoader with the same workers.

* Start point: the parent's ``time.time()`` immediately before ``subprocess.Popen``.
* End point: the child's ``time.time()`` printed right after its first ``optimizer.step()``
  returns (``MARK first_step``; the Worker side via a probe around ``Worker._train_step``).

Children also mark ``python_up`` (interpreter running), ``imports`` and ``built`` (config, data
sets, model and optimizer ready), so the report can say which phase costs what, and print their
own CPU time (``time.process_time``, DataLoader workers not included) at each mark.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import Row, interleave, median, paired_ratios
from bench.versus import user_environment
from trainer import config, data

REPO = Path(__file__).resolve().parents[1]
PHASES = ("python_up", "imports", "built", "first_step", "cpu_first_step")


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
        "optim.lr=0.05", "optim.momentum=0.9", "optim.nesterov=true", "optim.weight_decay=0.0005",
        "train.label_smoothing=0.1", f"data.cache_dir={workdir / 'cache'}",
        f"log.output_dir={workdir / 'runs'}", "log.progress_bar=on", "dist.device=cpu", "train.precision=fp32"]
    root = _prepare_data(overrides)
    counter = iter(range(10 ** 6))
    marks: dict[str, dict[str, list[float]]] = {"worker": {}, "hand-written": {}}
    commands = {
        "worker": lambda: [sys.executable, "-m", "bench.startup_worker", *overrides,
                           f"log.name=startup-{next(counter)}"],
        "hand-written": lambda: [sys.executable, "-m", "bench.startup_plain", str(root), str(image_size),
                                 str(batch), str(workers)],
    }
    runs = {side: (lambda side=side: _spawn(commands[side](), marks[side])) for side in commands}
    seconds = interleave(runs, repeats)
    cpu = median(marks["worker"]["cpu_first_step"]) / median(marks["hand-written"]["cpu_first_step"])
    row = Row(f"start-up to first step: python -m trainer vs plain script ({model}, {workers} loader workers)",
              "s", median(seconds["worker"]), median(seconds["hand-written"]), "plain script", goal, False,
              paired_ratios(seconds["worker"], seconds["hand-written"]),
              note=f"CPU-time ratio {cpu:.3f}; start = the parent's time.time() just before subprocess.run; "
                   "end = the child's time.time() printed right after its first optimizer.step() returned")
    return Startup(row, marks)


def _prepare_data(overrides: list[str]) -> Path:
    """Generate the synthetic image folder once, outside the timing; return its train/ folder."""
    cfg = config.load([], overrides)
    data.prepare(cfg.data)
    return Path(data.load_splits(cfg.data).train.root)  # type: ignore[attr-defined]


def _spawn(cmd: list[str], marks: dict[str, list[float]]) -> float:
    """Run one child; record its marks relative to the spawn; return seconds to its first step."""
    env = user_environment()
    spawned = time.time()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    found, cpu = {}, {}
    for line in done.stdout.splitlines():
        if line.startswith("MARK "):
            _, name, stamp, cpu_seconds = line.split()
            found[name], cpu[name] = float(stamp) - spawned, float(cpu_seconds)
    if done.returncode != 0 or "first_step" not in found:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    for name, value in found.items():
        marks.setdefault(name, []).append(value)
    marks.setdefault("cpu_first_step", []).append(cpu["first_step"])
    return found["first_step"]
