"""``python -m launcher``: the plan it prints for several machines, and real runs through it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.plan import Machine, Request, make_plan
from trainer.errors import EnvironmentProblem
from trainer.slurm import Allocation, allocation, expand_hostlist
from helpers import REPO, small_run

NO_SLURM = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def launcher(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, capture_output=True, text=True,
                          env={**NO_SLURM, "CUDA_VISIBLE_DEVICES": "", **(env or {})}, timeout=timeout)


def plan_lines(stdout: str) -> dict[str, str]:
    lines = [line.removeprefix("launcher: ") for line in stdout.splitlines() if line.startswith("launcher: ")]
    return {line[:19].strip(): line[19:].strip() for line in lines}


def test_dry_run_without_gpu_plans_one_cpu_process() -> None:
    result = launcher("--dry-run", "--", "train.epochs=3")
    assert result.returncode == 0, result.stderr
    plan = plan_lines(result.stdout)
    assert plan["nodes"].startswith("1 ") and plan["processes per node"].startswith("1 ")
    assert plan["device"].startswith("cpu") and plan["launcher"].startswith("python")
    assert plan["command"].endswith("-m trainer train.epochs=3")


def test_dry_run_in_a_two_node_slurm_job_plans_c10d_on_the_first_host() -> None:
    fake_job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost,node[2-3]", "SLURM_NODEID": "1",
                "SLURM_STEP_ID": "0"}
    result = launcher("--dry-run", "--nproc", "2", env=fake_job)
    assert result.returncode == 0, result.stderr
    plan = plan_lines(result.stdout)
    assert plan["nodes"].startswith("3 ") and plan["rendezvous"].startswith("c10d at localhost:24242")
    command = plan["command"]
    for part in ("torchrun", "--nnodes=3", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:24242",
                 "--rdzv-id=4242", "--nproc_per_node=2", "SIGUSR1"):
        assert part in command


def test_dry_run_via_accelerate_starts_two_real_processes_on_cpu() -> None:
    result = launcher("--dry-run", "--nproc", "2", "--via", "accelerate")
    assert result.returncode == 0, result.stderr
    command = plan_lines(result.stdout)["command"]
    assert command.startswith("accelerate launch --multi_gpu --num_processes 2")
    assert "--cpu" not in command, "accelerate --cpu starts one process only"


def test_multi_node_job_outside_srun_is_refused_with_the_fix() -> None:
    result = launcher("--dry-run", env={"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost,other"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "srun --ntasks-per-node=1" in result.stderr


def test_unresolvable_first_host_is_a_hard_error() -> None:
    job = Allocation(job_id="9", hosts=["no-such-host.invalid", "b"], node_rank=0, in_step=True)
    with pytest.raises(EnvironmentProblem, match="cannot resolve 'no-such-host.invalid'"):
        make_plan(Machine(gpus=0, mps=False, slurm=job), Request(nproc=1))


def test_gpu_and_mps_plans() -> None:
    gpu = make_plan(Machine(gpus=4, mps=False, slurm=None), Request())
    assert (gpu.nproc_per_node, gpu.backend, gpu.launcher) == (4, "nccl", "torchrun")
    with pytest.raises(EnvironmentProblem, match="only 4 GPU"):
        make_plan(Machine(gpus=4, mps=False, slurm=None), Request(nproc=8))
    mps = make_plan(Machine(gpus=0, mps=True, slurm=None), Request())
    assert (mps.nproc_per_node, mps.device, mps.launcher) == (1, "mps", "python")
    with pytest.raises(EnvironmentProblem, match="MPS supports one process"):
        make_plan(Machine(gpus=0, mps=True, slurm=None), Request(nproc=2))


def test_hostlist_expansion_and_array_job_ids() -> None:
    assert expand_hostlist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_hostlist("n[9-11]-ib") == ["n9-ib", "n10-ib", "n11-ib"]
    job = allocation({"SLURM_JOB_ID": "100", "SLURM_ARRAY_JOB_ID": "99", "SLURM_ARRAY_TASK_ID": "3",
                      "SLURM_JOB_NODELIST": "a[1-2]"})
    assert job is not None and job.job_id == "99_3" and job.hosts == ["a1", "a2"] and not job.in_step


@pytest.mark.slow
def test_launcher_runs_two_cpu_processes_end_to_end(tmp_path: Path) -> None:
    result = launcher("--nproc", "2", "--", *small_run(tmp_path, "train.epochs=2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es) on cpu (gloo)" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "runs" / "default" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["train/global_batch"] == 16


@pytest.mark.slow
def test_sigusr1_to_the_launcher_reaches_the_workers(tmp_path: Path) -> None:
    args = small_run(tmp_path, "train.epochs=50", "ckpt.every_steps=2")
    run = subprocess.Popen([sys.executable, "-m", "launcher", "--nproc", "2", "--", *args], cwd=REPO,
                           env={**NO_SLURM, "CUDA_VISIBLE_DEVICES": ""}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    first = tmp_path / "runs" / "default" / "checkpoints" / "step_000000002.pt"
    deadline = time.monotonic() + 120
    while not first.exists():
        assert run.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    run.send_signal(signal.SIGUSR1)
    output = run.communicate(timeout=120)[0]
    assert run.returncode == 128 + signal.SIGUSR1, output
    assert "stopped by SIGUSR1" in output and "checkpoint saved" in output
