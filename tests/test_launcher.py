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
import torch
from helpers import REPO, small_run

from launcher.__main__ import torchrun_options
from launcher.nodes import pytorchjob
from launcher.plan import Machine, Request, make_plan
from launcher.relay import StopRelay
from trainer.errors import EnvironmentProblem
from trainer.parallel.slurm import Allocation, allocation, expand_hostlist

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
    assert command.startswith("OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2")
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


def test_torchrun_options_are_feature_tested_and_the_shutdown_timeout_passed() -> None:
    assert torchrun_options() == {"--signals-to-handle", "--shutdown-timeout"}, "torch 2.14's torchrun has both"
    cpu = Machine(gpus=0, mps=False, slurm=None, cores=2)
    argv = make_plan(cpu, Request(nproc=2, shutdown_timeout=600)).argv
    assert "--shutdown-timeout=600" in argv and any(a.startswith("--signals-to-handle=") for a in argv)
    old = Machine(gpus=0, mps=False, slurm=None, cores=2, torchrun_options=frozenset())
    plan = make_plan(old, Request(nproc=2, shutdown_timeout=600))
    assert not any(a.startswith(("--signals-to-handle", "--shutdown-timeout")) for a in plan.argv)
    assert plan.env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "600"
    assert plan.command().startswith("TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 OMP_NUM_THREADS=1 torchrun ")


def test_cpu_processes_share_the_cores_through_omp_num_threads() -> None:
    plan = make_plan(Machine(gpus=0, mps=False, slurm=None, cores=16), Request(nproc=4))
    assert plan.env["OMP_NUM_THREADS"] == "4" and "16 cores / 4 process(es)" in "\n".join(plan.lines())
    assert make_plan(Machine(gpus=0, mps=False, slurm=None, cores=3), Request(nproc=4)).env["OMP_NUM_THREADS"] == "1"
    mine = make_plan(Machine(gpus=0, mps=False, slurm=None, cores=16, omp_num_threads="6"), Request(nproc=4))
    assert mine.env["OMP_NUM_THREADS"] == "6"
    assert "OMP_NUM_THREADS" not in make_plan(Machine(gpus=2, mps=False, slurm=None, cores=16), Request()).env
    assert "OMP_NUM_THREADS" not in make_plan(Machine(gpus=0, mps=False, slurm=None, cores=16), Request()).env


def test_relay_exit_code_is_the_workers_own() -> None:
    relay = StopRelay(["SIGTERM"], 1)
    assert relay.exit_code(signal.SIGTERM) == 128 + signal.SIGTERM, "no worker was running yet"
    relay.exit_codes = {10: 3, 11: 3}
    assert relay.exit_code(signal.SIGTERM) == 3
    relay.exit_codes = {10: 3, 11: 2}
    assert relay.exit_code(signal.SIGTERM) == 2
    relay.exit_codes = {10: 3, 11: -signal.SIGKILL}
    assert relay.exit_code(signal.SIGTERM) == 1, "a worker killed at the shutdown timeout is a failure"


def test_several_nodes_from_the_launcher_flags() -> None:
    cpu = Machine(gpus=0, mps=False, slurm=None, cores=4)
    plan = make_plan(cpu, Request(nproc=2, nnodes="2", node_rank=0, rdzv_endpoint="10.0.0.1:29400", rdzv_id="j7"))
    assert (plan.nnodes, plan.backend, plan.launcher) == ("2", "gloo", "torchrun")
    for part in ("--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=j7",
                 "--rdzv-conf=is_host=1", "--nproc_per_node=2"):
        assert part in plan.argv
    second = make_plan(cpu, Request(nnodes="2", node_rank=1, rdzv_endpoint="10.0.0.1:29400"))
    assert "--rdzv-conf=is_host=0" in second.argv and "--rdzv-id=launcher" in second.argv
    elastic = make_plan(cpu, Request(nnodes="1:2", rdzv_endpoint="node0:29400"))
    assert "--nnodes=1:2" in elastic.argv and elastic.backend == "gloo"
    accelerate = make_plan(cpu, Request(nnodes="2", node_rank=1, rdzv_endpoint="node0:29400", via="accelerate"))
    assert accelerate.argv[-6:-2] == ["--main_process_ip", "node0", "--main_process_port", "29400"]
    assert "--machine_rank" in accelerate.argv and "--num_processes" in accelerate.argv
    one = make_plan(cpu, Request(nnodes="1"))
    assert one.launcher == "python", "one node needs no rendezvous"


@pytest.mark.parametrize(("request_", "message"), [
    (Request(nnodes="2"), "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (Request(nnodes="two", rdzv_endpoint="a:1"), "must be a number of nodes N or a range MIN:MAX"),
    (Request(nnodes="3:2", rdzv_endpoint="a:1"), "need 1 <= MIN <= MAX"),
    (Request(nnodes="2", node_rank=2, rdzv_endpoint="a:1"), r"--node-rank 2 is not in 0\.\.1"),
    (Request(nnodes="2", rdzv_endpoint="node0"), "must be HOST:PORT"),
    (Request(nnodes="1:2", rdzv_endpoint="a:1", via="accelerate"), "elastic range, which only torchrun runs"),
])
def test_bad_node_flags_are_refused_with_the_fix(request_: Request, message: str) -> None:
    with pytest.raises(EnvironmentProblem, match=message):
        make_plan(Machine(gpus=0, mps=False, slurm=None), request_)


def test_node_flags_inside_slurm_are_refused() -> None:
    job = Allocation(job_id="9", hosts=["localhost"], node_rank=0, in_step=True)
    with pytest.raises(EnvironmentProblem, match="inside SLURM job 9"):
        make_plan(Machine(gpus=0, mps=False, slurm=job), Request(nnodes="2", rdzv_endpoint="a:1"))


def test_kubernetes_pytorchjob_pods_are_detected() -> None:
    """The variables Kubeflow's training operator sets in a pod (master service, node rank, PET_*)."""
    worker_pod = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "auto", "PET_NODE_RANK": "1", "RANK": "1",
                  "WORLD_SIZE": "2", "MASTER_ADDR": "train-master-0", "MASTER_PORT": "23456"}
    nodes = pytorchjob(worker_pod)
    assert nodes is not None and (nodes.host, nodes.port, nodes.node_rank) == ("train-master-0", 23456, 1)
    plan = make_plan(Machine(gpus=4, mps=False, slurm=None, pytorchjob=nodes), Request())
    assert plan.nproc_per_node == 4 and plan.backend == "nccl" and "PyTorchJob" in plan.reasons["nodes"]
    for part in ("--nnodes=2", "--rdzv-endpoint=train-master-0:23456", "--rdzv-conf=is_host=0", "--nproc_per_node=4"):
        assert part in plan.argv
    elastic_pod = {"PET_NNODES": "1:3", "PET_NPROC_PER_NODE": "2", "PET_RDZV_ENDPOINT": "train-c10d:29400",
                   "PET_RDZV_ID": "train", "PET_RDZV_BACKEND": "c10d"}
    nodes = pytorchjob(elastic_pod)
    plan = make_plan(Machine(gpus=0, mps=False, slurm=None, pytorchjob=nodes), Request())
    assert plan.nproc_per_node == 2 and plan.nnodes == "1:3"
    assert make_plan(Machine(gpus=4, mps=False, slurm=None, pytorchjob=nodes), Request()).nproc_per_node == 2
    assert "--rdzv-id=train" in plan.argv and not any(a.startswith("--rdzv-conf") for a in plan.argv)
    trainjob_pod = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": "1",  # Kubeflow Trainer v2
                    "PET_MASTER_ADDR": "train-node-0-0.train", "PET_MASTER_PORT": "29400"}
    nodes = pytorchjob(trainjob_pod)
    assert nodes is not None and (nodes.host, nodes.port, nodes.node_rank) == ("train-node-0-0.train", 29400, 1)
    assert "Trainer v2" in make_plan(Machine(gpus=4, mps=False, slurm=None, pytorchjob=nodes), Request()).reasons["nodes"]
    assert pytorchjob({"MASTER_ADDR": "a", "MASTER_PORT": "1", "RANK": "0", "WORLD_SIZE": "2"}) is None, \
        "torchrun's own variables are not a PyTorchJob"
    with pytest.raises(EnvironmentProblem, match="neither PET_MASTER_ADDR/PET_MASTER_PORT, MASTER_ADDR/MASTER_PORT nor"):
        pytorchjob({"PET_NNODES": "2"})


def test_pytorchjob_dry_run_through_the_cli() -> None:
    pod = {"PET_NNODES": "2", "PET_NODE_RANK": "0", "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost",
           "MASTER_PORT": "23456"}
    result = launcher("--dry-run", env=pod)
    assert result.returncode == 0, result.stderr
    plan = plan_lines(result.stdout)
    assert plan["rendezvous"].startswith("c10d at localhost:23456") and "is_host=1" in plan["command"]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError):
            continue
    return found


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_and_exits_3(tmp_path: Path) -> None:
    """A real 2-process run stopped by SIGTERM through ``python -m launcher``: the workers get it,
    save one loadable checkpoint and exit 3, which the launcher passes on; each worker had
    OMP_NUM_THREADS = cores / 2 and no OMP_WAIT_POLICY from the launcher (each chooses its own)."""
    args = small_run(tmp_path, "train.epochs=50", "ckpt.every_steps=2", "model.name=linear")
    env = {k: v for k, v in NO_SLURM.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["LOCAL_WORLD_SIZE"] = str((os.cpu_count() or 1) + 1)  # the launcher's own import picks PASSIVE
    run = subprocess.Popen([sys.executable, "-m", "launcher", "--nproc", "2", "--shutdown-timeout", "60", "--",
                            *args], cwd=REPO, env={**env, "CUDA_VISIBLE_DEVICES": ""}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    checkpoints = tmp_path / "runs" / "default" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step_*.pt")):
        assert run.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    workers = _children(run.pid)
    environs = [dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
                for pid in workers]
    run.send_signal(signal.SIGTERM)
    output = run.communicate(timeout=120)[0]
    assert run.returncode == 3, output
    assert output.count("stopped by SIGTERM") == 2 and "checkpoint saved" in output
    assert "launcher: got SIGTERM: the workers saved a checkpoint and stopped" in output
    assert len(workers) == 2
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert [e["OMP_NUM_THREADS"] for e in environs] == [threads, threads]
    assert not any("OMP_WAIT_POLICY" in e for e in environs)
    last = torch.load(checkpoints / "last.pt", weights_only=True, map_location="cpu")
    assert last["epoch"] >= 0 and any(key.endswith("weight") for key in last["model"])
