"""Real SLURM jobs on the local single-node cluster (fixture ``slurm_cluster``, 2 CPUs).

- ``srun -n 2 python -m trainer``: ranks from SLURM_PROCID/SLURM_NTASKS, rendezvous derived by the
  Worker from the node list and the job id;
- ``sbatch slurm/train_1node.sbatch`` and ``slurm/train_multinode.sbatch`` (on one node) with two
  CPU worker processes;
- preemption: the warning signal reaches the batch shell (what ``--signal=B:USR1@T`` sends before
  the time limit), the workers checkpoint, the job is requeued once, restarts with
  SLURM_RESTART_COUNT=1 and resumes.

Every run is compared with a local ``torchrun --standalone --nproc_per_node=2`` run of the same
config: both are 2-process gloo runs with the same seed, so the final weights and every logged
metric must be bitwise equal. About 2.5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO
from slurm_cluster import SlurmCluster, clean_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SMALL = ["data.synthetic_classes=3", "data.synthetic_train_per_class=64", "data.synthetic_val_per_class=20",
         "data.image_size=16", "data.num_workers=0", "data.batch_size=16", "train.epochs=2"]
# Long enough (3 epochs of 38 steps per rank, ~3 s each) to be stopped in the middle of epoch 2;
# one DataLoader worker per rank, because the stop signal reaches every process of the job step.
LONGER = ["data.synthetic_classes=3", "data.synthetic_train_per_class=400", "data.synthetic_val_per_class=20",
          "data.image_size=16", "data.num_workers=1", "data.batch_size=16", "train.epochs=3"]
JOB_TIMEOUT_S = 150


def trainer_args(work: Path, name: str, config: list[str], *extra: str) -> list[str]:
    return [*config, f"log.output_dir={work / 'runs'}", f"log.name={name}", f"data.cache_dir={work / 'cache'}",
            "log.progress_bar=off", "dist.timeout_s=120", *extra]


def job_env() -> dict[str, str]:
    """What sbatch/srun pass on to the job (sbatch exports the submitting environment)."""
    return clean_env({"PYTHONPATH": str(REPO), "PYTHON": sys.executable, "NPROC_PER_NODE": "2"})


def run_dir(work: Path, name: str) -> Path:
    return work / "runs" / name


def last_checkpoint(work: Path, name: str) -> dict:
    return torch.load(run_dir(work, name) / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def metrics(work: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir(work, name) / "metrics.jsonl").read_text().splitlines()]


def math_history(state: dict) -> list[dict]:
    """The per-epoch records without the timings (which naturally differ between runs)."""
    timing = ("images_per_s", "data_wait", "time_s", "peak_mem_mb", "tflops", "mfu")
    return [{k: v for k, v in record.items() if not k.endswith(timing)} for record in state["history"]]


def assert_same_run(work: Path, name: str, reference: str) -> None:
    """Same final val/top1 (metrics.jsonl), same history and bitwise-equal weights."""
    ours, ref = metrics(work, name), metrics(work, reference)
    assert len(ours) == len(ref), f"{name}: {len(ours)} epoch records, reference {len(ref)}"
    assert ours[-1]["val/top1"] == ref[-1]["val/top1"]
    a, b = last_checkpoint(work, name), last_checkpoint(work, reference)
    assert (a["epoch"], a["global_step"], a["world_size"]) == (b["epoch"], b["global_step"], b["world_size"])
    assert math_history(a) == math_history(b)
    for key, tensor in b["model"].items():
        assert torch.equal(a["model"][key], tensor), f"{name}: weights differ from {reference} at {key}"


def local_torchrun(work: Path, name: str, config: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer", *trainer_args(work, name, config)]
    env = clean_env({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"local torchrun failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


def job_log(work: Path, job_name: str, job: str) -> str:
    """The job's output file, named by the scripts' `--output=slurm-%x-%j.out` in the submit dir."""
    path = work / f"slurm-{job_name}-{job}.out"
    assert path.exists(), f"no {path.name} in the submit directory: {sorted(p.name for p in work.iterdir())}"
    return path.read_text(errors="replace")


def submit(cluster: SlurmCluster, work: Path, script: str, *args: str, sbatch: tuple[str, ...] = ()) -> str:
    """sbatch a script from slurm/ with two CPU worker processes, submitted from ``work``."""
    opts = ["--gpus-per-node=0", "--cpus-per-task=2", "--time=5", *sbatch]
    return cluster.sbatch([*opts, str(REPO / "slurm" / script), *args], cwd=work, env=job_env())


def wait_done(cluster: SlurmCluster, work: Path, job: str, job_name: str) -> dict[str, str]:
    info = cluster.wait_for(job, ("COMPLETED",), timeout=JOB_TIMEOUT_S)
    assert info["JobState"] == "COMPLETED", f"job {job} ended {info['JobState']}:\n{job_log(work, job_name, job)[-4000:]}"
    return info


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Submit directory, run directories and data cache: on local disk, which slurmd (root) sees."""
    return tmp_path_factory.mktemp("slurm-jobs")


@pytest.fixture(scope="module")
def reference(work: Path) -> str:
    local_torchrun(work, "torchrun-small", SMALL)
    return "torchrun-small"


def test_srun_two_tasks_train_like_torchrun(slurm_cluster: SlurmCluster, work: Path, reference: str) -> None:
    """srun -n 2 python -m trainer: 2 ranks from SLURM_*, MASTER_ADDR/PORT derived by the Worker."""
    cmd = ["srun", "-n", "2", "--time=5", "--job-name=trainer-srun", sys.executable, "-m", "trainer",
           *trainer_args(work, "srun", SMALL)]
    out = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "2 process(es) on cpu (gloo)" in text
    logs = run_dir(work, "srun") / "logs"
    assert (logs / "rank_0.log").exists() and (logs / "rank_1.log").exists()
    assert_same_run(work, "srun", reference)


def test_sbatch_1node_matches_local_torchrun(slurm_cluster: SlurmCluster, work: Path, reference: str) -> None:
    job = submit(slurm_cluster, work, "train_1node.sbatch", *trainer_args(work, "sbatch-1node", SMALL))
    info = wait_done(slurm_cluster, work, job, "train")
    log = job_log(work, "train", job)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    assert "2 worker(s)" in log and "2 process(es) on cpu (gloo)" in log
    assert "trainer arguments: " + " ".join(trainer_args(work, "sbatch-1node", SMALL)) in log   # "$@" intact
    assert_same_run(work, "sbatch-1node", reference)


def test_sbatch_multinode_script_on_one_node(slurm_cluster: SlurmCluster, work: Path, reference: str) -> None:
    """The multi-node script's c10d rendezvous on the first host of the node list, with --nodes=1."""
    job = submit(slurm_cluster, work, "train_multinode.sbatch", *trainer_args(work, "sbatch-mn", SMALL),
                 sbatch=("--nodes=1",))
    wait_done(slurm_cluster, work, job, "train-mn")
    log = job_log(work, "train-mn", job)
    assert f"1 node(s) x 2 worker(s), rendezvous localhost:{20000 + int(job) % 10000}" in log
    assert_same_run(work, "sbatch-mn", reference)


@pytest.fixture(scope="module")
def uninterrupted(work: Path) -> str:
    local_torchrun(work, "torchrun-longer", LONGER)
    return "torchrun-longer"


@pytest.mark.parametrize("requeued_by", ["trainer", "batch-shell"])
def test_warning_signal_checkpoints_requeues_and_resumes(slurm_cluster: SlurmCluster, work: Path,
                                                         uninterrupted: str, requeued_by: str) -> None:
    """The time-limit warning path, end to end, with the signal sent by hand for a fixed timing.

    `scancel --batch --signal=USR1` delivers exactly what `#SBATCH --signal=B:USR1@180` sends before
    the limit. The trainer requeues itself by default; with ckpt.requeue=false the batch shell does.
    """
    name = f"preempt-{requeued_by}"
    extra = ["ckpt.requeue=false"] if requeued_by == "batch-shell" else []
    job = submit(slurm_cluster, work, "train_1node.sbatch", *trainer_args(work, name, LONGER, *extra))
    first_epoch = run_dir(work, name) / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not first_epoch.exists():
        state = slurm_cluster.state(job)
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job} {state} before its first epoch ended"
        assert time.monotonic() < deadline, f"job {job}: no epoch finished in {JOB_TIMEOUT_S} s"
        time.sleep(0.2)
    slurm_cluster.cancel(job, "--batch", "--signal=USR1")

    info = slurm_cluster.wait_for(job, ("PENDING",), timeout=60, poll_s=0.2)
    assert info["JobState"] == "PENDING", f"job {job} was not requeued ({info['JobState']}):\n" + job_log(work, "train", job)[-4000:]
    slurm_cluster.start_requeued_soon(job)   # else SLURM waits ~20-30 s (credential expiry)
    info = wait_done(slurm_cluster, work, job, "train")
    log = job_log(work, "train", job)   # --open-mode=append: both attempts

    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    assert f"job {job} attempt 1" in log and f"job {job} attempt 2" in log
    assert log.count("stopped by SIGUSR1") == 2, log[-4000:]   # both ranks, in attempt 1
    assert "checkpoint saved, exit code 3" in log
    by_trainer, by_shell = f"requeueing SLURM job {job}" in log, f"=== requeueing job {job}" in log
    assert (by_trainer, by_shell) == (requeued_by == "trainer", requeued_by == "batch-shell"), log[-4000:]
    assert "resumed from" in log.split(f"job {job} attempt 2")[1]
    assert_same_run(work, name, uninterrupted)


def test_sigterm_to_the_whole_step_still_checkpoints(slurm_cluster: SlurmCluster, work: Path) -> None:
    """Cancel, preemption and `scontrol requeue` send SIGTERM to EVERY process of the step.

    The DataLoader workers get it too; the workers must still stop at a step boundary and save.
    """
    name = "sigterm"
    job = submit(slurm_cluster, work, "train_1node.sbatch", *trainer_args(work, name, LONGER))
    first_epoch = run_dir(work, name) / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not first_epoch.exists():
        assert slurm_cluster.state(job) in ("PENDING", "CONFIGURING", "RUNNING")
        assert time.monotonic() < deadline, f"job {job}: no epoch finished in {JOB_TIMEOUT_S} s"
        time.sleep(0.2)
    slurm_cluster.cancel(job, "--signal=TERM")   # every process of the job's steps, as slurmstepd does
    info = slurm_cluster.wait_for(job, ("COMPLETED",), timeout=JOB_TIMEOUT_S)
    log = job_log(work, "train", job)
    assert info["Restarts"] == "0" and "requeueing SLURM job" not in log and "=== requeueing" not in log
    assert log.count("stopped by SIGTERM") == 2, log[-4000:]
    assert "DataLoader worker" not in log
