"""What the Worker and the launcher need to know about SLURM: the job, its hosts, requeueing."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
from dataclasses import dataclass

from trainer.errors import EnvironmentProblem

log = logging.getLogger("trainer")


@dataclass(frozen=True)
class Allocation:
    """The SLURM job this process runs in."""

    job_id: str
    hosts: list[str]
    node_rank: int
    in_step: bool
    """True inside an ``srun`` job step, False in the batch script itself."""

    @property
    def nnodes(self) -> int:
        return len(self.hosts)

    def rendezvous(self) -> tuple[str, int]:
        """The first host of the node list (checked to resolve) and a port derived from the job id."""
        host = self.hosts[0]
        try:
            socket.getaddrinfo(host, None)
        except socket.gaierror:
            raise EnvironmentProblem(f"cannot resolve '{host}', the first host of the SLURM node list; "
                                     "set MASTER_ADDR to an address every node can reach") from None
        return host, 20000 + int(re.sub(r"\D", "", self.job_id) or 0) % 10000


def allocation(environ: dict[str, str] | None = None) -> Allocation | None:
    """The current SLURM allocation, or None outside SLURM."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in env:
        return None
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or socket.gethostname()
    return Allocation(job_id=job_id(env) or env["SLURM_JOB_ID"], hosts=expand_hostlist(nodelist),
                      node_rank=int(env.get("SLURM_NODEID", "0")), in_step="SLURM_STEP_ID" in env)


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand SLURM's compressed host list: ``gpu[01-03,07],login1`` -> gpu01 gpu02 gpu03 gpu07 login1."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", hostlist):
        prefix, ranges, suffix = match.groups()
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            width = len(first)
            for number in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{number:0{width}d}{suffix}")
    return hosts


def job_id(environ: dict[str, str] | None = None) -> str | None:
    """The id ``scontrol`` knows this job by: ``<array job>_<task>`` for array tasks."""
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def may_requeue(max_requeues: int, environ: dict[str, str] | None = None) -> bool:
    """Whether this job may be requeued once more: SLURM counts earlier requeues in SLURM_RESTART_COUNT."""
    env = os.environ if environ is None else environ
    done = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    if done >= max_requeues:
        log.warning("not requeueing: this job was requeued %d time(s) already (ckpt.max_requeues=%d)",
                    done, max_requeues)
        return False
    return True


def requeue() -> None:
    """Put this SLURM job back in the queue so it resumes from its checkpoint (rank 0 only)."""
    job = job_id()
    if job is None:
        return
    # Said before asking: SLURM answers the requeue by ending the step, which may kill this process.
    log.warning("requeueing SLURM job %s: the next attempt resumes from the checkpoint", job)
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:   # e.g. no scontrol inside a container
        log.error("could not requeue SLURM job %s: %s (the batch script may requeue it)", job, exc)
        return
    if result.returncode != 0:
        log.error("could not requeue SLURM job %s: %s", job, (result.stderr or result.stdout).strip())
