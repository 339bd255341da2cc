"""Decide how to start the Worker on this machine, and say why, one line per decision."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field

from trainer.errors import EnvironmentProblem
from trainer.slurm import Allocation

STOP_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""Signals torchrun's agent forwards to the workers (its default lacks SLURM's SIGUSR1)."""


@dataclass(frozen=True)
class Machine:
    """What the launcher found: accelerators and the SLURM allocation, if any."""

    gpus: int
    mps: bool
    slurm: Allocation | None


@dataclass(frozen=True)
class Request:
    """What the user asked for on the command line."""

    nproc: int | None = None
    via: str = "auto"
    max_restarts: int = 0
    trainer_args: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """The decisions, the reason for each, and the command that carries them out."""

    nnodes: int
    nproc_per_node: int
    device: str
    backend: str
    rendezvous: str
    launcher: str
    argv: list[str]
    reasons: dict[str, str]

    def lines(self) -> list[str]:
        values = {"nodes": self.nnodes, "processes per node": self.nproc_per_node, "device": self.device,
                  "backend": self.backend, "rendezvous": self.rendezvous, "launcher": self.launcher}
        return [f"{name:<19}{value}  ({self.reasons[name]})" for name, value in values.items()]

    def command(self) -> str:
        """The equivalent shell command."""
        return shlex.join(self.argv)


def make_plan(machine: Machine, request: Request) -> Plan:
    """Pick nodes, processes, device, backend, rendezvous and launcher for ``machine``."""
    reasons: dict[str, str] = {}
    job = machine.slurm
    if job is not None and job.nnodes > 1 and not job.in_step:
        raise EnvironmentProblem(f"this SLURM job has {job.nnodes} nodes but the launcher runs only in the batch "
                                 "script; start one per node: srun --ntasks-per-node=1 python -m launcher ...")
    nnodes = job.nnodes if job else 1
    reasons["nodes"] = f"SLURM job {job.job_id}" if job else "no SLURM allocation"

    if machine.gpus:
        device, backend = "cuda", "nccl"
        reasons["device"] = f"{machine.gpus} CUDA device(s) visible"
        nproc = request.nproc or machine.gpus
        reasons["processes per node"] = "--nproc" if request.nproc else "one per GPU"
        if nproc > machine.gpus:
            raise EnvironmentProblem(f"--nproc {nproc} but only {machine.gpus} GPU(s) are visible; "
                                     f"use --nproc {machine.gpus} or fewer")
    elif machine.mps:
        device, backend, nproc = "mps", "none", 1
        reasons["device"] = "Apple MPS, no CUDA"
        reasons["processes per node"] = "MPS runs a single process"
        if (request.nproc or 1) > 1:
            raise EnvironmentProblem("MPS supports one process only; drop --nproc, or add dist.device=cpu "
                                     "after -- to train on CPU processes")
    else:
        device = "cpu"
        nproc = request.nproc or 1
        backend = "gloo" if nproc * nnodes > 1 else "none"
        reasons["device"] = "no CUDA or MPS device"
        reasons["processes per node"] = "--nproc" if request.nproc else "one CPU process (use --nproc N for more)"
    reasons["backend"] = "one process: no process group" if backend == "none" else f"{device} -> {backend}"

    distributed = nproc * nnodes > 1 or request.max_restarts > 0
    via = request.via if request.via != "auto" else ("torchrun" if distributed else "python")
    if via == "python" and (distributed or request.max_restarts):
        raise EnvironmentProblem("--via python runs one process without restarts; use --via torchrun")
    reasons["launcher"] = "requested" if request.via != "auto" else (
        "several processes or restarts" if distributed else "a single process needs no launcher")

    trainer = ["-m", "trainer", *request.trainer_args]
    if job is not None and via != "python":
        host, port = job.rendezvous()
        rendezvous = f"c10d at {host}:{port}"
        reasons["rendezvous"] = "first host of the job's node list, port from the job id"
    elif via != "python":
        host, port, rendezvous = "127.0.0.1", 0, "standalone on this machine"
        reasons["rendezvous"] = "one node"
    else:
        host, port, rendezvous = "", 0, "none"
        reasons["rendezvous"] = "one process"

    if via == "python":
        argv = [sys.executable, *trainer]
    elif via == "torchrun":
        argv = ["torchrun", *_torchrun_args(nnodes, nproc, job, host, port, request.max_restarts), *trainer]
    else:
        argv = ["accelerate", "launch", *_accelerate_args(nnodes, nproc, device, job, host, port), *trainer]
    return Plan(nnodes, nproc, device, backend, rendezvous, via, argv, reasons)


def _torchrun_args(nnodes: int, nproc: int, job: Allocation | None, host: str, port: int,
                   max_restarts: int) -> list[str]:
    args = [f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}", f"--signals-to-handle={STOP_SIGNALS}"]
    if job is None:
        return ["--standalone", *args]
    return [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={host}:{port}",
            f"--rdzv-id={job.job_id}", *args]


def _accelerate_args(nnodes: int, nproc: int, device: str, job: Allocation | None, host: str,
                     port: int) -> list[str]:
    # `--cpu --num_processes N` starts one process (accelerate#2741); --multi_gpu with gloo starts N.
    args = ["--num_processes", str(nproc * nnodes), "--num_machines", str(nnodes), "--mixed_precision", "no",
            "--dynamo_backend", "no"]
    if nproc * nnodes > 1:
        args.insert(0, "--multi_gpu")
    if job is None:
        return [*args, "--main_process_port", "0"]
    return [*args, "--machine_rank", str(job.node_rank), "--main_process_ip", host, "--main_process_port", str(port)]
