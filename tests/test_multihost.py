"""Two real hosts, simulated by network namespaces (tests/netns.py): one ``python -m launcher``
(hence one torchrun) per host, meeting at a c10d rendezvous on host 0.

Needs root and iproute2; skipped with the reason elsewhere. Every byte between the hosts goes over
the veth pair of the namespaces made here; the one-host reference runs inside host 0's namespace.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import netns
import pytest
import torch
from netns_slurm import two_node_cluster
from slurm_cluster import ClusterUnavailable
from test_resume import RECORDING, args
from test_sharding import EPOCHS, MODEL, assert_each_sample_once

from trainer.errors import EXIT_HANG

REPO = Path(__file__).resolve().parents[1]
RDZV_PORT = 29400  # inside fresh namespaces: nothing else listens there
VAL_SAMPLES = 3 * 11  # not a multiple of 2 or 4 processes: padded duplicates would show
TIMEOUT_S = 10  # dist.step_timeout_s of the lost-host run

pytestmark = [pytest.mark.multihost, pytest.mark.slow]


@pytest.fixture
def hosts() -> Iterator[tuple[netns.Host, netns.Host]]:
    try:
        context = netns.two_hosts()
        pair = context.__enter__()
    except netns.HostsUnavailable as exc:
        pytest.skip(f"cannot simulate two hosts with network namespaces: {exc}")
    try:
        yield pair
    finally:
        context.__exit__(None, None, None)
        assert not any(host.exists() for host in pair), "a namespace was left behind"


def run_args(tmp: Path, name: str, *extra: str) -> list[str]:
    return [f"log.output_dir={tmp / 'runs'}", f"log.name={name}", f"data.cache_dir={tmp / 'cache'}",
            "data.synthetic_classes=3", "data.synthetic_train_per_class=64", "data.synthetic_val_per_class=11",
            "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "log.progress_bar=off",
            "model.name=linear", *extra]


def job_env(host: netns.Host, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PET_", "OMP_"))}
    env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", GLOO_SOCKET_IFNAME=host.interface, **extra)
    return env


def launch(host: netns.Host, tmp: Path, log: str, launcher_args: list[str], trainer_args: list[str],
           **env: str) -> subprocess.Popen:
    env = job_env(host, **env)
    argv = [sys.executable, "-m", "launcher", *launcher_args, "--", *trainer_args]
    return host.popen(argv, env, tmp / log, REPO)


def on_two_hosts(hosts: tuple[netns.Host, netns.Host], tmp: Path, nproc: int, trainer_args: list[str],
                 **env: str) -> list[subprocess.Popen]:
    endpoint = f"{hosts[0].address}:{RDZV_PORT}"
    return [launch(host, tmp, f"host{rank}.log", ["--nproc", str(nproc), "--nnodes", "2", "--node-rank", str(rank),
                                                  "--rdzv-endpoint", endpoint, "--local-addr", host.address],
                   trainer_args, **env) for rank, host in enumerate(hosts)]


def finish(processes: list[subprocess.Popen], tmp: Path, logs: list[str], timeout: float = 240) -> list[str]:
    outputs = []
    for process, log in zip(processes, logs):
        process.wait(timeout=timeout)
        outputs.append((tmp / log).read_text())
    return outputs


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_hosts_train_exactly_like_one_host(hosts: tuple[netns.Host, netns.Host], tmp_path: Path) -> None:
    """2 hosts x 2 processes end with the same weights, bit for bit, as 4 processes on one host
    (gloo reduces in the same order: rank order, whatever host a rank is on), and validation counts
    each sample once. (2 hosts x 1 process: the SLURM test below, against 2 processes on one host.)"""
    nproc = 2
    world = 2 * nproc
    two = on_two_hosts(hosts, tmp_path, nproc, run_args(tmp_path, "two_hosts", "train.epochs=1"))
    one = launch(hosts[0], tmp_path, "one_host.log", ["--nproc", str(world)],  # at the same time: CI minutes
                 run_args(tmp_path, "one_host", "train.epochs=1"))
    outputs = finish([*two, one], tmp_path, ["host0.log", "host1.log", "one_host.log"])
    assert [p.returncode for p in [*two, one]] == [0, 0, 0], "\n".join(outputs)
    assert f"| {world} process(es) on cpu (gloo) |" in outputs[0]
    assert f"c10d at {hosts[0].address}:{RDZV_PORT}" in outputs[1]

    runs = tmp_path / "runs"
    for name in ("two_hosts", "one_host"):
        history = records(runs / name)
        assert [r["val/samples"] for r in history] == [VAL_SAMPLES], name
        assert history[-1]["train/global_batch"] == 8 * world
    assert records(runs / "two_hosts")[-1]["train/loss"] == records(runs / "one_host")[-1]["train/loss"]
    weights = [torch.load(runs / name / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")["model"]
               for name in ("two_hosts", "one_host")]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_losing_a_host_ends_the_survivor_with_one_line_and_a_restart_resumes(
        hosts: tuple[netns.Host, netns.Host], tmp_path: Path) -> None:
    """Host 1 drops off the network mid-epoch (its link goes down: no reset, only silence). Host 0
    ends within dist.step_timeout_s plus a margin, saying which rank did not answer; started again
    alone, it resumes from the last checkpoint and finishes."""
    args = run_args(tmp_path, "lost", "train.epochs=4", "ckpt.every_steps=4", f"dist.step_timeout_s={TIMEOUT_S}")
    two = on_two_hosts(hosts, tmp_path, 1, args)
    checkpoints = tmp_path / "runs" / "lost" / "checkpoints"
    deadline = time.monotonic() + 180
    while not list(checkpoints.glob("step_*.pt")):
        assert all(p.poll() is None for p in two) and time.monotonic() < deadline, \
            "no checkpoint appeared\n" + (tmp_path / "host0.log").read_text()
        time.sleep(0.05)
    subprocess.run(["ip", "-n", hosts[1].namespace, "link", "set", hosts[1].interface, "down"], check=True)
    margin = 30  # the survivors' reports (8 s), torchrun's shutdown, a busy CI machine
    try:
        two[0].wait(timeout=TIMEOUT_S + margin)
    except subprocess.TimeoutExpired:
        pytest.fail(f"host 0 still runs {TIMEOUT_S + margin} s after host 1 was cut off\n"
                    + (tmp_path / "host0.log").read_text())
    output = (tmp_path / "host0.log").read_text()
    assert two[0].returncode == EXIT_HANG, output
    lost = [line for line in output.splitlines() if line.startswith("error [rank 0]:")]
    assert len(lost) == 1 and "rank 1 (node 1, " in lost[0] and "did not answer" in lost[0], output
    assert "Timed out" in lost[0] and "hang: " in lost[0], output
    assert output.rstrip().splitlines()[-1] == "launcher: " + lost[0].removeprefix("error [rank 0]: ")
    assert "Traceback" not in output

    alone = launch(hosts[0], tmp_path, "alone.log", ["--nproc", "1"], args)
    output = finish([alone], tmp_path, ["alone.log"])[0]
    assert alone.returncode == 0, output
    resumed = re.search(r"resumed from \S*last\.pt: epoch (\d+), (\d+) of (\d+) samples done", output)
    assert resumed, output  # a checkpoint of 2 processes (mid-epoch unless the cut came late), continued by 1
    history = records(tmp_path / "runs" / "lost")
    assert history[-1]["epoch"] == 4 and all(r["val/samples"] == VAL_SAMPLES for r in history)
    # The interrupted epoch counts what the 2 processes trained before the checkpoint plus what the
    # survivor trained after it: the whole epoch, once (the rest of the same global order, re-sharded).
    assert history[int(resumed[1]) - 1]["train/samples"] == int(resumed[3])


def test_kubeflow_trainer_v2_variables_alone_start_two_hosts(hosts: tuple[netns.Host, netns.Host],
                                                             tmp_path: Path) -> None:
    """A Kubeflow Trainer v2 TrainJob sets only PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK and
    PET_MASTER_ADDR/PET_MASTER_PORT in each pod: with those and no node flags, the launcher on each
    host joins one 2-node job that trains and finishes. (``--local-addr`` stands in for the pod's
    own DNS name, which these namespaces lack.)"""
    master = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_MASTER_ADDR": hosts[0].address,
              "PET_MASTER_PORT": str(RDZV_PORT)}
    pods = [launch(host, tmp_path, f"pod{rank}.log", ["--local-addr", host.address],
                   run_args(tmp_path, "trainjob", "train.epochs=1"), **master, PET_NODE_RANK=str(rank))
            for rank, host in enumerate(hosts)]
    outputs = finish(pods, tmp_path, ["pod0.log", "pod1.log"])
    assert [p.returncode for p in pods] == [0, 0], "\n".join(outputs)
    assert "Kubeflow Trainer v2" in outputs[1] and "| 2 process(es) on cpu (gloo) |" in outputs[0]
    assert [r["val/samples"] for r in records(tmp_path / "runs" / "trainjob")] == [VAL_SAMPLES]


def torchrun_on_two_hosts(hosts: tuple[netns.Host, netns.Host], tmp: Path, name: str, nproc: int,
                          trainer_args: list[str], **env: str) -> list[subprocess.Popen]:
    """``recording_worker.py`` under torchrun on each host (the launcher's command, with a script),
    recording into ``tmp/record/<name>``."""
    (tmp / "record" / name).mkdir(parents=True, exist_ok=True)
    endpoint = f"{hosts[0].address}:{RDZV_PORT}"
    processes = []
    for rank, host in enumerate(hosts):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}", f"--rdzv-id={name}", f"--rdzv-conf=is_host={int(rank == 0)}",
                f"--local-addr={host.address}", f"--nproc_per_node={nproc}", str(RECORDING), *trainer_args]
        environment = job_env(host, OMP_NUM_THREADS="1", RECORD_DIR=str(tmp / "record" / name), **env)
        environment["PYTHONPATH"] += os.pathsep + str(REPO / "tests")  # the sharding tests' model
        processes.append(host.popen(argv, environment, tmp / f"{name}-host{rank}.log", REPO))
    return processes


def test_hsdp_on_two_hosts_stops_mid_epoch_and_resumes_each_sample_once(hosts: tuple[netns.Host, netns.Host],
                                                                       tmp_path: Path) -> None:
    """HSDP on 2 hosts x 2 processes: each host's processes shard the model, the hosts replicate it.
    Stopped by SIGTERM in the second epoch, it saves sharded (DCP) checkpoints, resumes from one on
    the same hosts and finishes, every training sample served once per epoch."""
    name = "hsdp"
    trainer_args = args(tmp_path, name, "log.pictures=false", f"model.name={MODEL}", "dist.strategy=hsdp",
                        "dist.hsdp_shard_size=2", f"train.epochs={EPOCHS}", "optim.lr=0.02")
    logs = [f"{name}-host{rank}.log" for rank in range(2)]
    stopped = finish(torchrun_on_two_hosts(hosts, tmp_path, name, 2, trainer_args, STOP_AT_STEP="9"), tmp_path, logs)
    assert "checkpoint saved, exit code 3" in stopped[0], "\n".join(stopped)
    assert "| 4 process(es) on cpu (gloo) | hsdp: " in stopped[0]
    checkpoints = tmp_path / "runs" / name / "checkpoints"
    assert (checkpoints / "last.ptr").is_file() and not list(checkpoints.glob("*.pt"))

    resumed = torchrun_on_two_hosts(hosts, tmp_path, name, 2, trainer_args)
    outputs = finish(resumed, tmp_path, logs)
    assert [p.returncode for p in resumed] == [0, 0], "\n".join(outputs)
    assert re.search(r"resumed from \S*last\.ptr: epoch 2, \d+ of 192 samples done", outputs[0]), outputs[0]
    assert_each_sample_once(tmp_path, name)
    assert [r["epoch"] for r in records(tmp_path / "runs" / name)] == [1, 2]


@pytest.mark.slurm
def test_sbatch_on_two_slurm_nodes_is_preempted_requeued_and_ends_like_one_uninterrupted_host(
        hosts: tuple[netns.Host, netns.Host], tmp_path: Path) -> None:
    """``sbatch --nodes=2 slurm/train_multinode.sbatch`` on a slurmd per host: the warning signal
    (USR1 to the batch shell, as ``--signal=B:USR1@T`` sends it) makes both nodes' workers save and
    stop, the job requeues, resumes and ends with the weights of an uninterrupted run (the same
    2 processes on one host, run meanwhile)."""
    longer = ["data.synthetic_train_per_class=256", "train.epochs=2", "ckpt.every_steps=8"]
    single_thread = {"OMP_NUM_THREADS": "1"}  # the same on both sides: sbatch gives 1 CPU per node
    try:
        context = two_node_cluster(hosts, tmp_path / "slurm")
        cluster = context.__enter__()
    except ClusterUnavailable as exc:
        pytest.skip(f"no two-node SLURM cluster: {exc}")
    try:
        reference = launch(hosts[0], tmp_path, "one_host.log", ["--nproc", "2"],
                           run_args(tmp_path, "uninterrupted", *longer), **single_thread)
        env = job_env(hosts[0], PYTHON=sys.executable, CPU_BIND="", **single_thread)
        job = cluster.sbatch(["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=5",
                              str(REPO / "slurm" / "train_multinode.sbatch"), *run_args(tmp_path, "sbatch", *longer)],
                             cwd=tmp_path, env=env)
        log = tmp_path / f"slurm-train-mn-{job}.out"
        checkpoints = tmp_path / "runs" / "sbatch" / "checkpoints"
        deadline = time.monotonic() + 180
        while not list(checkpoints.glob("step_*.pt")):
            assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING") and time.monotonic() < deadline, \
                f"job {job}: no checkpoint\n" + (log.read_text() if log.exists() else "(no log)")
            time.sleep(0.1)
        cluster.cancel(job, "--batch", "--signal=USR1")
        info = cluster.wait_for(job, ("PENDING",), timeout=120)
        assert info["JobState"] == "PENDING", f"job {job} was not requeued ({info['JobState']}):\n{log.read_text()}"
        cluster.start_requeued_soon(job)
        info = cluster.wait_for(job, ("COMPLETED",), timeout=240)
        output = log.read_text()
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", output[-4000:]
        assert "2 node(s) x 1 worker(s), rendezvous nodea:" in output
        # Rank 0 requeued before any node exited (the batch shell's fallback was not needed).
        by_trainer, by_shell = f"requeueing SLURM job {job}" in output, f"=== requeueing job {job}" in output
        assert (by_trainer, by_shell) == (True, False) and "resumed from" in output, output[-6000:]
        assert output.count("stopped by SIGUSR1") >= 1 and "| 2 process(es) on cpu (gloo) |" in output
        output = finish([reference], tmp_path, ["one_host.log"])[0]
        assert reference.returncode == 0, output
    finally:
        for job_id in cluster.jobs:
            cluster.cancel(job_id)
        context.__exit__(None, None, None)
    runs = tmp_path / "runs"
    assert [r["val/samples"] for r in records(runs / "sbatch")] == [VAL_SAMPLES, VAL_SAMPLES]
    weights = [torch.load(runs / name / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")["model"]
               for name in ("sbatch", "uninterrupted")]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
