"""A real single-node SLURM cluster on this machine for the tests marked ``slurm``.

``start()`` runs ``tests/slurm_local/setup.sh`` (installs slurm-wlm and munge with apt when missing,
writes the config, starts munged, slurmctld and slurmd, waits for the node to be idle: a few seconds,
about 20 s with the apt install) and returns a :class:`SlurmCluster` whose ``stop()`` runs
``teardown.sh`` (the daemons are stopped by the PIDs in their pidfiles). A setup that fails stops
whatever it had started. :class:`ClusterUnavailable` says why no cluster can be had here (not root,
not Linux, no SLURM and no apt); the ``slurm_cluster`` fixture in conftest.py turns it into a skip.

There is no accounting daemon, so there is no ``sacct``: jobs are followed with ``scontrol show job``
(finished jobs stay visible for MinJobAge=600 s).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETUP = HERE / "slurm_local" / "setup.sh"
TEARDOWN = HERE / "slurm_local" / "teardown.sh"
EXIT_NO_PACKAGES = 3
EXIT_ALREADY_RUNNING = 4
SETUP_TIMEOUT_S = 900.0
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED")


class ClusterUnavailable(Exception):
    """No local SLURM cluster can be started on this machine (the reason is the message)."""


def unavailable_reason() -> str | None:
    """Why the local cluster cannot be started here, or None if it can be tried."""
    if not sys.platform.startswith("linux"):
        return "the local SLURM cluster needs Linux"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (it may apt-install slurm-wlm and starts munged, slurmctld, slurmd)"
    if not (shutil.which("slurmctld") and shutil.which("munged")) and not shutil.which("apt-get"):
        return "SLURM (slurm-wlm, munge) is not installed and there is no apt-get to install it"
    return None


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without the variables that would steer a launch elsewhere.

    Outer SLURM job variables would make srun join that job; torchrun's would make the Worker
    believe it already has a rank.
    """
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("SLURM_", "SRUN_", "SBATCH_", "SALLOC_", "TORCHELASTIC_", "PET_"))}
    env.update(extra or {})
    return env


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _run_script(script: Path, log_path: Path, env: dict[str, str], timeout: float) -> int:
    """Run a setup/teardown script with its output in ``log_path``; on timeout kill its whole group."""
    with open(log_path, "a") as log:
        proc = subprocess.Popen(["bash", str(script)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # the script and what it ran (apt...), not the daemons
            proc.wait()
            raise


@dataclass
class SlurmCluster:
    """Handle on the running cluster, with the few scontrol/sbatch helpers the tests need."""

    log_path: Path
    started: bool
    """False when a cluster was already running here: we use it and leave it running."""
    setup_s: float
    jobs: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------------------ jobs
    def sbatch(self, args: list[str], *, cwd: Path, env: dict[str, str]) -> str:
        """Submit (``sbatch --parsable ARGS``) and return the job id."""
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, f"sbatch {' '.join(args)} failed: {out.stderr.strip()}"
        job = out.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, ...); {} if unknown."""
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
        fields: dict[str, str] = {}
        for token in out.stdout.split():
            key, sep, value = token.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait_for(self, job_id: str, states: tuple[str, ...], timeout: float, poll_s: float = 0.5) -> dict[str, str]:
        """Poll until the job is in one of ``states`` (or has finished); return its fields."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "UNKNOWN")
            if state in states or state in FINISHED:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {state} after {timeout:.0f} s (waiting for {states})")
            time.sleep(poll_s)

    def start_requeued_soon(self, job_id: str, settle_s: float = 4.0) -> None:
        """Start a just-requeued (PENDING) job after ``settle_s`` instead of SLURM's ~20-30 s.

        Not at once: slurmd rejects ("Job credential revoked") a credential created in the same
        second as the one it revoked when the previous attempt ended, and the job then FAILS.
        """
        time.sleep(settle_s)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, timeout=60)

    def cancel(self, job_id: str, *extra: str) -> None:
        subprocess.run(["scancel", *extra, job_id], capture_output=True, timeout=60)

    def cancel_all(self) -> None:
        """Cancel every job this handle submitted that has not finished (after a failed test)."""
        for job in self.jobs:
            if self.state(job) not in FINISHED:
                self.cancel(job)
        self.jobs.clear()

    # ------------------------------------------------------------------------------ lifetime
    def stop(self) -> None:
        """Stop the daemons we started, by PID (teardown.sh); leave a pre-existing cluster alone."""
        if self.started:
            _run_script(TEARDOWN, self.log_path, clean_env(), timeout=120)
            self.started = False


def start(log_path: Path, ncpus: int = 2) -> SlurmCluster:
    """Bring the cluster up (or adopt one already running); raise ClusterUnavailable to skip."""
    reason = unavailable_reason()
    if reason:
        raise ClusterUnavailable(reason)
    t0 = time.monotonic()
    env = clean_env({"NCPUS": str(ncpus)})
    try:
        rc = _run_script(SETUP, log_path, env, timeout=SETUP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _run_script(TEARDOWN, log_path, env, timeout=120)
        raise RuntimeError(f"SLURM setup took over {SETUP_TIMEOUT_S:.0f} s; log {log_path}:\n{_log_tail(log_path)}")
    except BaseException:
        _run_script(TEARDOWN, log_path, env, timeout=120)
        raise
    elapsed = time.monotonic() - t0
    if rc == 0:
        return SlurmCluster(log_path, started=True, setup_s=elapsed)
    if rc == EXIT_NO_PACKAGES:
        raise ClusterUnavailable(f"slurm-wlm/munge are not installed and apt could not install them "
                                 f"(see {log_path}): {_log_tail(log_path, 3)}")
    if rc == EXIT_ALREADY_RUNNING:
        info = subprocess.run(["sinfo", "-h", "-N", "-o", "%T %c"], capture_output=True, text=True, timeout=60)
        node = info.stdout.split()
        if info.returncode != 0 or len(node) < 2 or node[0] not in ("idle", "mixed") or int(node[1]) < ncpus:
            raise ClusterUnavailable(f"a SLURM cluster is already running here but is not usable "
                                     f"(sinfo: {info.stdout.strip() or info.stderr.strip()})")
        return SlurmCluster(log_path, started=False, setup_s=elapsed)
    _run_script(TEARDOWN, log_path, env, timeout=120)   # setup.sh already did; harmless twice
    raise RuntimeError(f"tests/slurm_local/setup.sh failed with exit code {rc}; log {log_path}:\n{_log_tail(log_path)}")
