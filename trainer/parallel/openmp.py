"""OpenMP settings that must be chosen before ``import torch``: usable cores, and the wait policy.

This module imports nothing heavy: ``trainer/__init__.py`` runs :func:`apply_wait_policy` before
any trainer module imports torch, whose OpenMP runtime reads ``OMP_WAIT_POLICY`` once, at load.
"""

from __future__ import annotations

import os
from typing import MutableMapping

USER_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
"""``OMP_WAIT_POLICY`` as this process found it, before :func:`apply_wait_policy` (None: unset)."""

wait_policy_reason = "not chosen yet"
"""Why the current ``OMP_WAIT_POLICY`` holds: one phrase for the start-up log."""


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask where the OS has one (Linux), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_processes(environ: MutableMapping[str, str]) -> int:
    """Training processes on this machine: torchrun's ``LOCAL_WORLD_SIZE``, else SLURM's tasks per node."""
    if "LOCAL_WORLD_SIZE" in environ:
        return max(1, int(environ["LOCAL_WORLD_SIZE"]))
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ:
        per_node = environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        return max(1, int(per_node or environ["SLURM_NTASKS"]))
    return 1


def threads_per_process(environ: MutableMapping[str, str], cores: int, processes: int) -> int:
    """``OMP_NUM_THREADS`` if set, else the Worker's choice (``distributed.setup``): its share of the cores."""
    value = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else max(1, cores // processes)


def choose_wait_policy(environ: MutableMapping[str, str], cores: int) -> tuple[str | None, str]:
    """The wait policy for this run and why: the user's if set; else PASSIVE when this machine's
    local processes x threads outnumber the usable cores, where a spinning thread holds a core that
    another rank needs (docs/benchmarks.md measures both cases). Otherwise None: OpenMP's default,
    which spins briefly before it sleeps, as a user's own script runs (threads that sleep at once
    slow a single process next to its DataLoader workers).

    The machine's load is left out on purpose: its average lags, so the run before (a restart, a
    requeue, the other side of a benchmark) would decide for this one. On a machine shared with
    other busy jobs, set ``OMP_WAIT_POLICY=PASSIVE`` yourself.
    """
    if environ.get("OMP_WAIT_POLICY"):
        return environ["OMP_WAIT_POLICY"], "from the environment"
    processes = local_processes(environ)
    threads = processes * threads_per_process(environ, cores, processes)
    ours = f"{processes} process(es) x {threads // processes} thread(s)"
    if threads > cores:
        return "PASSIVE", f"{ours} > {cores} usable core(s)"
    return None, f"OpenMP's default: {ours} on {cores} usable core(s)"


def apply_wait_policy(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set ``OMP_WAIT_POLICY`` in ``environ`` as :func:`choose_wait_policy` decides; note why."""
    global wait_policy_reason
    policy, wait_policy_reason = choose_wait_policy(environ, usable_cores())
    if policy is not None:
        environ["OMP_WAIT_POLICY"] = policy


def user_environment(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """A copy of ``environ`` with ``OMP_WAIT_POLICY`` as the user set it (or unset), for starting
    processes that must choose their own: Workers of another size (the launcher), plain scripts (bench)."""
    env = {k: v for k, v in environ.items() if k != "OMP_WAIT_POLICY"}
    if USER_WAIT_POLICY is not None:
        env["OMP_WAIT_POLICY"] = USER_WAIT_POLICY
    return env


def restore_user_wait_policy(environ: MutableMapping[str, str] = os.environ) -> None:
    """Put ``OMP_WAIT_POLICY`` back as the user set it (or unset) before starting Workers."""
    environ.pop("OMP_WAIT_POLICY", None)
    if USER_WAIT_POLICY is not None:
        environ["OMP_WAIT_POLICY"] = USER_WAIT_POLICY


def describe_wait_policy() -> str:
    """``OMP_WAIT_POLICY=... (why)`` for the start-up log."""
    return f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} ({wait_policy_reason})"
