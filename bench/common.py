"""Shared pieces: the workload, in-memory batches, the real Worker, the hand-written loop, timing."""

from __future__ import annotations

import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence, TypeVar

import torch
import torchvision
from torch import nn

from trainer import config, data, distributed
from trainer.signals import StopRequest
from trainer.worker import Worker

Batch = tuple[torch.Tensor, torch.Tensor, int]
"""The Worker's batch format: images, targets and the number of skipped (unreadable) samples."""

# The optimisation both sides run, passed to the Worker as overrides so defaults can change freely.
LR, MOMENTUM, WEIGHT_DECAY, LABEL_SMOOTHING = 0.05, 0.9, 5e-4, 0.1


@dataclass(frozen=True)
class Spec:
    """One training workload, identical for the Worker and the hand-written loop."""

    model: str = "resnet18"
    image_size: int = 64
    batch: int = 64
    classes: int = 10
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    channels_last: bool = False
    device: str = "cpu"
    compile: bool = False  # torch.compile on both sides

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        layout = ", channels_last" if self.channels_last else ""
        compiled = ", compiled" if self.compile else ""
        return f"{self.model} {self.image_size}px, batch {self.batch}, {self.precision}{layout}{compiled}, {self.device}"


class Timing(NamedTuple):
    """One timed run: wall-clock seconds, and CPU seconds of this process (all its threads).

    On a shared machine CPU time is the steadier of the two: it does not count the time this
    process waited for a core. It does count OpenMP threads spinning and background threads.
    """

    wall: float
    cpu: float


def clock() -> Timing:
    """Both clocks now; subtract two readings with :func:`since`."""
    return Timing(time.perf_counter(), time.process_time())


def since(start: Timing) -> Timing:
    now = clock()
    return Timing(now.wall - start.wall, now.cpu - start.cpu)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on the CPU, where every op is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the Worker side
def worker_overrides(spec: Spec, workdir: Path, name: str, world_size: int = 1) -> list[str]:
    """Config overrides that make the Worker train ``spec`` with the hand-written loop's settings.

    The synthetic data set is only as large as one batch per process needs (the Worker checks
    that); its loader is replaced by in-memory batches before training anyway.
    """
    per_class = math.ceil(spec.batch * world_size / spec.classes)
    return [
        f"model.name={spec.model}", f"data.image_size={spec.image_size}", f"data.batch_size={spec.batch}",
        f"data.synthetic_classes={spec.classes}", f"data.synthetic_train_per_class={per_class}",
        "data.synthetic_val_per_class=1", "data.num_workers=0", f"data.cache_dir={workdir / 'cache'}",
        f"log.output_dir={workdir / 'runs'}", f"log.name={name}", "log.progress_bar=off",
        f"train.precision={spec.precision}", f"model.channels_last={str(spec.channels_last).lower()}",
        f"model.compile={str(spec.compile).lower()}",
        f"dist.device={spec.device}", f"optim.lr={LR}", f"optim.momentum={MOMENTUM}", "optim.nesterov=true",
        f"optim.weight_decay={WEIGHT_DECAY}", f"train.label_smoothing={LABEL_SMOOTHING}",
        "sched.name=constant", "sched.warmup_epochs=0",  # constant lr, as in the hand-written loop
    ]


def build_worker(spec: Spec, workdir: Path, name: str, extra: Sequence[str] = ()) -> Worker:
    """A real Worker built from a real Config (its metric sinks open at their first write, as in ``Worker.fit``)."""
    world_size = distributed.discover().world_size
    cfg = config.load([], [*worker_overrides(spec, workdir, name, world_size), *extra])
    env = distributed.setup(cfg.dist.device, cfg.dist.backend, cfg.dist.timeout_s)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    worker = Worker(cfg, env, cfg.run_dir, StopRequest())
    return worker


def time_worker_epoch(worker: Worker, batches: Sequence[Batch]) -> Timing:
    """Time ``worker.train_epoch()`` over ``batches`` (held in memory, no DataLoader)."""
    worker.train_loader = batches
    batch, world = worker.cfg.data.batch_size, worker.env.world_size
    worker.train_sampler = data.TrainBatchSampler(len(batches) * batch * world, world, worker.env.rank, batch, 0)
    worker.position = data.Position(worker.position.epoch, 0)  # normally advanced by Worker._end_epoch
    synchronize(worker.device)
    start = clock()
    worker.train_epoch()
    synchronize(worker.device)
    return since(start)


# ----------------------------------------------------------------------------- the hand-written side
def build_plain_model(spec: Spec) -> nn.Module:
    """The same architecture as the Worker's, written without the trainer package."""
    if spec.model == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * spec.image_size ** 2, spec.classes))
    return torchvision.models.get_model(spec.model, weights=None, num_classes=spec.classes)


class PlainLoop:
    """The plainest correct training loop for ``spec``: forward, loss, backward, step, zero_grad.

    Same SGD settings as the Worker (weight decay on weights only, none on biases and norms, as
    the Worker's default ``optim.decay_norm_and_bias=false``), PyTorch's default optimizer
    implementation, same label-smoothed loss, same autocast dtype and memory format.
    """

    def __init__(self, spec: Spec, init_from: nn.Module) -> None:
        self.device = torch.device(spec.device)
        self.dtype, self.memory_format = spec.autocast_dtype, spec.memory_format
        self.model = build_plain_model(spec).to(self.device, memory_format=self.memory_format)
        self.model.load_state_dict(init_from.state_dict())  # start from the Worker's weights
        self.forward = torch.compile(self.model) if spec.compile else self.model
        params = list(self.model.parameters())
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": WEIGHT_DECAY},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        self.optimizer = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, nesterov=True)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)

    def run(self, batches: Sequence[Batch]) -> Timing:
        """Train on ``batches``; return how long it took."""
        model, optimizer, criterion, device = self.forward, self.optimizer, self.criterion, self.device
        model.train()
        synchronize(device)
        start = clock()
        for images, targets, _ in batches:
            images = images.to(device, non_blocking=True, memory_format=self.memory_format)
            targets = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=self.dtype) if self.dtype else nullcontext():
                loss = criterion(model(images), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return since(start)


# ----------------------------------------------------------------------------- data and checks
def make_batches(spec: Spec, count: int, seed: int = 0, distinct: int = 8) -> list[Batch]:
    """``count`` batches cycling through ``distinct`` random ones, already on the device and in its layout."""
    gen = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(min(count, distinct)):
        images = torch.randn(spec.batch, 3, spec.image_size, spec.image_size, generator=gen)
        targets = torch.randint(0, spec.classes, (spec.batch,), generator=gen)
        pool.append((images.to(spec.device, memory_format=spec.memory_format), targets.to(spec.device), 0))
    return [pool[i % len(pool)] for i in range(count)]


def max_param_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Largest absolute difference between two state dicts' floating-point entries (same work check)."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class StepStamps(Sequence[Batch]):
    """``batches`` that note the time whenever the next one is taken: per-step times of any loop.

    Per-step times show a step's own cost even on a busy machine: most steps of a few hundred
    microseconds run without being preempted, so low percentiles hardly move with the load.
    """

    def __init__(self, batches: Sequence[Batch]) -> None:
        self.batches = batches
        self.stamps: list[float] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Batch:  # type: ignore[override]
        return self.batches[index]

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.batches:
            self.stamps.append(time.perf_counter())
            yield batch
        self.stamps.append(time.perf_counter())

    def step_us(self) -> list[float]:
        """Microseconds between consecutive requests for a batch: one training step each, with the
        loop's per-step bookkeeping but not its per-epoch set-up and wind-down."""
        return [(b - a) * 1e6 for a, b in zip(self.stamps, self.stamps[1:])]


def recorded(run: Callable[[Sequence[Batch]], Timing], batches: Sequence[Batch],
             step_us: list[float]) -> Callable[[], Timing]:
    """A zero-argument run of ``run(batches)`` that also appends its per-step times to ``step_us``."""
    def go() -> Timing:
        stamped = StepStamps(batches)
        timing = run(stamped)
        step_us.extend(stamped.step_us())
        return timing
    return go


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ----------------------------------------------------------------------------- timing and results
T = TypeVar("T")


def interleave(runs: Mapping[str, Callable[[], T]], repeats: int) -> dict[str, list[T]]:
    """Call every run once per round, ``repeats`` rounds; each round starts one run later (A B, B A, ...).

    Rotating the order cancels drift in the machine's load; returns each run's values in order.
    """
    names = list(runs)
    values: dict[str, list[T]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            values[name].append(runs[name]())
    return values


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


@dataclass
class Row:
    """One line of the results table: the Worker's median vs a baseline's median, and the goal."""

    case: str
    metric: str
    worker: float
    baseline: float
    baseline_name: str
    goal: float | None  # None: reported, no goal
    higher_is_better: bool
    pair_ratios: list[float] = field(default_factory=list)
    cpu_ratio: float | None = None  # the same ratio measured in CPU time, where that makes sense
    note: str = ""

    @property
    def ratio(self) -> float:
        """The median of the per-round ratios (each round's two runs were timed back to back)."""
        return statistics.median(self.pair_ratios) if self.pair_ratios else self.ratio_of_medians

    @property
    def ratio_of_medians(self) -> float:
        return self.worker / self.baseline

    @property
    def ok(self) -> bool:
        """Goal met (always true for a row that is only reported, ``goal=None``)."""
        if self.goal is None:
            return True
        return self.ratio >= self.goal if self.higher_is_better else self.ratio <= self.goal

    @property
    def goal_text(self) -> str:
        return "-" if self.goal is None else f"{'>=' if self.higher_is_better else '<='} {self.goal:g}"

    @property
    def verdict(self) -> str:
        return "reported" if self.goal is None else "ok" if self.ok else "MISSED"


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Round-by-round ratios a/b: their spread shows how noisy the machine was."""
    return [x / y for x, y in zip(a, b)]
