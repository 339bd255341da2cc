"""What the Worker needs to know about SLURM: the job id and how to requeue the job."""

from __future__ import annotations

import logging
import os
import subprocess

log = logging.getLogger("trainer")


def job_id(environ: dict[str, str] | None = None) -> str | None:
    """The id ``scontrol`` knows this job by: ``<array job>_<task>`` for array tasks."""
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue_if_configured(enabled: bool) -> None:
    """Put this SLURM job back in the queue so it resumes from its checkpoint (rank 0 only)."""
    job = job_id()
    if not enabled or job is None:
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if result.returncode == 0:
        log.warning("requeued SLURM job %s: it will resume from the checkpoint", job)
    else:
        log.error("could not requeue SLURM job %s: %s", job, (result.stderr or result.stdout).strip())
