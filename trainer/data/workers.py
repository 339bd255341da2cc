"""How many DataLoader workers a training process starts, and what its main process keeps for itself.

``data.num_workers: auto`` counts the cores this process may use (its affinity mask, the cgroup's
CPU quota, SLURM's ``--cpus-per-task``), shares them among the training processes of the machine,
and leaves the main process its part: on a GPU it launches kernels, reads the workers' batches and
pins them (one busy Python thread and two helpers), so it keeps one core and the workers take the
rest; on the CPU it also computes the model, so the workers take a quarter and its OpenMP threads
the rest. The main process's OpenMP threads are then cut to the cores the workers leave (a parallel
region waits for its slowest thread, and a thread that shares its core with a busy worker is slow).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from trainer.parallel import openmp

AUTO = "auto"
MAX_AUTO_WORKERS = 32
"""The most workers ``auto`` starts per training process: beyond, each added worker costs start-up
time and memory (its batches in flight) for little: pick an integer on a bigger machine if it helps."""
BATCHES_IN_FLIGHT = 16
"""Batches the workers of one loader prepare ahead together, about; each worker keeps 2 to 4."""


def prefetch_factor(workers: int) -> int:
    """Batches each worker prepares ahead: 4 with few workers, down to PyTorch's default 2 with many,
    so that the batches in flight (shared and page-locked memory) stop growing 4 per worker."""
    return max(2, min(4, math.ceil(BATCHES_IN_FLIGHT / workers))) if workers > 0 else 0


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"), own: str | None = None) -> float | None:
    """CPUs the cgroup quota of this process allows (e.g. ``docker run --cpus=4``: 4.0); None if unlimited.

    cgroup v2: ``cpu.max`` ("quota period", or "max period") in the process's group and each group
    above it, the smallest counting; cgroup v1: ``cpu/cpu.cfs_quota_us`` over ``cpu.cfs_period_us``.
    ``own`` is the group's path (default: from ``/proc/self/cgroup``).
    """
    if own is None:
        try:
            own = next((line.split(":", 2)[2].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                        if line.startswith("0::")), "/")
        except OSError:
            own = "/"
    limits = []
    root = root.resolve()
    group = (root / own.lstrip("/")).resolve()
    for folder in [group, *group.parents]:
        limit = _read_cpu_max(folder / "cpu.max")
        if limit is not None:
            limits.append(limit)
        if folder == root or root not in folder.parents:
            break
    v1 = _read_v1_quota(root / "cpu")
    if v1 is not None:
        limits.append(v1)
    return min(limits) if limits else None


def _read_cpu_max(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" or int(period) <= 0 else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _read_v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


@dataclass(frozen=True)
class Cores:
    """What this process saw: usable cores and where the number came from."""

    per_process: int
    """Cores for this training process and its workers."""
    seen: str
    """How: e.g. ``16 in the affinity mask, cgroup quota 8, 2 local processes``."""


def cores_per_process(affinity: int, quota: float | None, local_processes: int, cpus_per_task: int | None,
                      started_by_slurm: bool) -> Cores:
    """This training process's share of the cores.

    The machine gives ``affinity`` cores, or fewer under a cgroup ``quota``; SLURM's
    ``--cpus-per-task`` caps what one task holds. A task that torchrun (or a plain script) runs
    holds every local process, which share it; a process that SLURM started itself is its own task.
    """
    machine = affinity if quota is None else max(1, min(affinity, math.floor(quota)))
    task = min(machine, cpus_per_task) if cpus_per_task else machine
    sharing = 1 if started_by_slurm and cpus_per_task else local_processes
    seen = [f"{affinity} in the affinity mask"]
    if quota is not None:
        seen.append(f"cgroup quota {quota:g}")
    if cpus_per_task:
        seen.append(f"SLURM_CPUS_PER_TASK={cpus_per_task}")
    if sharing > 1:
        seen.append(f"{sharing} local processes")
    return Cores(max(1, task // sharing), ", ".join(seen))


@dataclass(frozen=True)
class WorkerPlan:
    """The loader workers of one training process, and the OpenMP threads its main process keeps."""

    workers: int
    main_threads: int | None
    """None: leave the main process's threads as they are (an integer ``data.num_workers``, or
    ``OMP_NUM_THREADS`` set by the user)."""
    cores: Cores

    def describe(self, asked: int | str) -> str:
        how = "data.num_workers=auto" if asked == AUTO else f"data.num_workers={asked}"
        threads = f", main process {self.main_threads} OpenMP thread(s)" if self.main_threads else ""
        return f"{self.workers} loader worker(s) per process ({how}; {self.cores.per_process} core(s) each: " \
               f"{self.cores.seen}){threads}"


def auto_workers(cores: int, accelerator: bool) -> int:
    """Workers for a process with ``cores``: all but one on an accelerator (the main process keeps
    one), a quarter on the CPU (the main process computes); at least 1, at most :data:`MAX_AUTO_WORKERS`."""
    share = cores - 1 if accelerator else cores // 4
    return max(1, min(MAX_AUTO_WORKERS, share))


def main_threads(cores: int, workers: int) -> int:
    """The main process's OpenMP threads when the workers are busy: the cores they leave, at least 1."""
    return max(1, cores - workers)


def plan(asked: int | str, device_type: str, environ: Mapping[str, str] = os.environ,
         affinity: int | None = None, cgroup_root: Path = Path("/sys/fs/cgroup")) -> WorkerPlan:
    """The workers for ``data.num_workers`` (an integer or ``auto``) on this machine."""
    slurm_task = environ.get("SLURM_CPUS_PER_TASK", "").strip()
    started_by_slurm = "LOCAL_WORLD_SIZE" not in environ and int(environ.get("SLURM_NTASKS", "1")) > 1
    cores = cores_per_process(openmp.usable_cores() if affinity is None else affinity,
                              cgroup_cpu_limit(cgroup_root), openmp.local_processes(dict(environ)),
                              int(slurm_task) if slurm_task.isdigit() and int(slurm_task) > 0 else None,
                              started_by_slurm)
    if asked != AUTO:
        return WorkerPlan(int(asked), None, cores)
    workers = auto_workers(cores.per_process, device_type != "cpu")
    threads = None if environ.get("OMP_NUM_THREADS") else main_threads(cores.per_process, workers)
    return WorkerPlan(workers, threads, cores)

