"""Decide how to start the Worker on this machine, and say why, one line per decision."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field

from launcher.nodes import Nodes, nodes_from_flags
from trainer.errors import EnvironmentProblem
from trainer.parallel.slurm import Allocation

STOP_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""Signals torchrun's agent forwards to the workers (its default lacks SLURM's SIGUSR1)."""

SHUTDOWN_TIMEOUT_S = 120
"""Seconds the workers get to save a checkpoint after a stop signal before torchrun SIGKILLs them
(torchrun's own default, 30 s, can cut a large model's save short)."""


@dataclass(frozen=True)
class Machine:
    """What the launcher found: accelerators, cores, torchrun's options and the scheduler, if any."""

    gpus: int
    mps: bool
    slurm: Allocation | None
    cores: int = 1
    torchrun_options: frozenset[str] = frozenset({"--signals-to-handle", "--shutdown-timeout"})
    """The options this torch's torchrun accepts, of those the launcher may pass."""
    omp_num_threads: str | None = None
    """``OMP_NUM_THREADS`` as already set in the environment, if it is."""
    pytorchjob: Nodes | None = None
    """The nodes a Kubernetes PyTorchJob pod was given (see :mod:`launcher.nodes`)."""


@dataclass(frozen=True)
class Request:
    """What the user asked for on the command line."""

    nproc: int | None = None
    via: str = "auto"
    max_restarts: int = 0
    shutdown_timeout: int = SHUTDOWN_TIMEOUT_S
    nnodes: str | None = None
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    local_addr: str | None = None
    trainer_args: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """The decisions, the reason for each, and the command that carries them out."""

    nnodes: str
    nproc_per_node: int
    device: str
    backend: str
    rendezvous: str
    launcher: str
    argv: list[str]
    reasons: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    """Variables the launcher exports to the workers."""

    def lines(self) -> list[str]:
        values = {"nodes": self.nnodes, "processes per node": self.nproc_per_node, "device": self.device,
                  "backend": self.backend, "rendezvous": self.rendezvous, "launcher": self.launcher}
        if "threads" in self.reasons:
            values["threads"] = self.env.get("OMP_NUM_THREADS", "torch's default")
        return [f"{name:<19}{value}  ({self.reasons[name]})" for name, value in values.items()]

    def command(self) -> str:
        """The equivalent shell command."""
        return shlex.join([f"{name}={value}" for name, value in self.env.items()] + self.argv)


def make_plan(machine: Machine, request: Request) -> Plan:
    """Pick nodes, processes, device, backend, rendezvous and launcher for ``machine``."""
    reasons: dict[str, str] = {}
    job = machine.slurm
    flags = nodes_from_flags(request.nnodes, request.node_rank, request.rdzv_endpoint, request.rdzv_id)
    if request.local_addr and flags is None and machine.pytorchjob is None:
        raise EnvironmentProblem("--local-addr is for several nodes: add --nnodes and --rdzv-endpoint")
    if flags is not None and (job is not None or machine.pytorchjob is not None):
        where = f"SLURM job {job.job_id}" if job is not None else "a Kubernetes PyTorchJob"
        raise EnvironmentProblem(f"--nnodes/--node-rank/--rdzv-endpoint given inside {where}, which already "
                                 "says where the nodes are; drop them")
    if job is not None and job.nnodes > 1 and not job.in_step:
        raise EnvironmentProblem(f"this SLURM job has {job.nnodes} nodes but the launcher runs only in the batch "
                                 "script; start one per node: srun --ntasks-per-node=1 python -m launcher ...")
    nodes = flags or machine.pytorchjob
    if nodes is not None:
        nnodes, most_nodes = nodes.nnodes, nodes.max_nodes
        reasons["nodes"] = nodes.source
    else:
        nnodes = str(job.nnodes if job else 1)
        most_nodes = int(nnodes)
        reasons["nodes"] = f"SLURM job {job.job_id}" if job else "no SLURM allocation"

    given = nodes.nproc_per_node if nodes is not None else None  # a PyTorchJob's nprocPerNode
    if machine.gpus:
        device, backend = "cuda", "nccl"
        reasons["device"] = f"{machine.gpus} CUDA device(s) visible"
        nproc = request.nproc or given or machine.gpus
        reasons["processes per node"] = "--nproc" if request.nproc else nodes.source if given else "one per GPU"
        if nproc > machine.gpus:
            raise EnvironmentProblem(f"--nproc {nproc} but only {machine.gpus} GPU(s) are visible; "
                                     f"use --nproc {machine.gpus} or fewer")
    elif machine.mps:
        device, backend, nproc = "mps", "none", 1
        reasons["device"] = "Apple MPS, no CUDA"
        reasons["processes per node"] = "MPS runs a single process"
        if (request.nproc or 1) > 1 or most_nodes > 1:
            raise EnvironmentProblem("MPS supports one process only; drop --nproc and --nnodes, or add "
                                     "dist.device=cpu after -- to train on CPU processes")
    else:
        device = "cpu"
        nproc = request.nproc or given or 1
        backend = "gloo" if nproc * most_nodes > 1 else "none"
        reasons["device"] = "no CUDA or MPS device"
        reasons["processes per node"] = "--nproc" if request.nproc else nodes.source if given else (
            "one CPU process (use --nproc N for more)")
    reasons["backend"] = "one process: no process group" if backend == "none" else f"{device} -> {backend}"

    elastic = nodes is not None and nodes.min_nodes != nodes.max_nodes
    distributed = nproc * most_nodes > 1 or request.max_restarts > 0
    via = request.via if request.via != "auto" else ("torchrun" if distributed or nodes is not None else "python")
    if via == "python" and (distributed or request.max_restarts):
        raise EnvironmentProblem("--via python runs one process without restarts; use --via torchrun")
    if via == "accelerate" and elastic:
        raise EnvironmentProblem(f"--nnodes {nnodes} is an elastic range, which only torchrun runs; "
                                 "use --via torchrun or a fixed --nnodes")
    reasons["launcher"] = "requested" if request.via != "auto" else (
        "several processes or restarts" if distributed else "a single process needs no launcher")

    trainer = ["-m", "trainer", *request.trainer_args]
    if nodes is not None and via != "python":
        host, port = nodes.host, nodes.port
        rendezvous = f"c10d at {host}:{port}"
        reasons["rendezvous"] = f"{nodes.source}, id {nodes.rdzv_id}"
    elif job is not None and via != "python":
        host, port = job.rendezvous()
        rendezvous = f"c10d at {host}:{port}"
        reasons["rendezvous"] = "first host of the job's node list, port from the job id"
    elif via != "python":
        host, port, rendezvous = "127.0.0.1", 0, "standalone on this machine"
        reasons["rendezvous"] = "one node"
    else:
        host, port, rendezvous = "", 0, "none"
        reasons["rendezvous"] = "one process"

    env: dict[str, str] = {}
    if via == "python":
        argv = [sys.executable, *trainer]
    elif via == "torchrun":
        argv = ["torchrun", *_torchrun_args(nnodes, nproc, job, nodes, host, port, request, machine, env), *trainer]
    else:
        if nodes is not None and nodes.node_rank is None:
            raise EnvironmentProblem("accelerate needs each machine's rank: add --node-rank, or use --via torchrun")
        node_rank = job.node_rank if job is not None else nodes.node_rank if nodes is not None else 0
        argv = ["accelerate", "launch", *_accelerate_args(most_nodes, nproc, node_rank, host, port, job, nodes),
                *trainer]
    if device == "cpu" and via != "python":
        # torchrun and accelerate set OMP_NUM_THREADS=1 when it is unset: one core per process in all.
        if machine.omp_num_threads is None:
            env["OMP_NUM_THREADS"] = str(max(1, machine.cores // nproc))
            reasons["threads"] = f"{machine.cores} cores / {nproc} process(es)"
        else:
            reasons["threads"] = "OMP_NUM_THREADS from the environment"
            env["OMP_NUM_THREADS"] = machine.omp_num_threads
    return Plan(nnodes, nproc, device, backend, rendezvous, via, argv, reasons, env)


def _torchrun_args(nnodes: str, nproc: int, job: Allocation | None, nodes: Nodes | None, host: str, port: int,
                   request: Request, machine: Machine, env: dict[str, str]) -> list[str]:
    args = [f"--nproc_per_node={nproc}", f"--max-restarts={request.max_restarts}"]
    if "--signals-to-handle" in machine.torchrun_options:
        args.append(f"--signals-to-handle={STOP_SIGNALS}")
    if "--shutdown-timeout" in machine.torchrun_options:
        args.append(f"--shutdown-timeout={request.shutdown_timeout}")
    else:
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(request.shutdown_timeout)
    if nodes is not None:
        rendezvous = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={host}:{port}",
                      f"--rdzv-id={nodes.rdzv_id}"]
        if nodes.node_rank is not None:
            # Node 0 hosts the rendezvous store at the endpoint, whatever name the endpoint goes by.
            rendezvous.append(f"--rdzv-conf=is_host={int(nodes.node_rank == 0)}")
        if request.local_addr:
            rendezvous.append(f"--local-addr={request.local_addr}")
        return [*rendezvous, *args]
    if job is None:
        return ["--standalone", *args]
    return [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={host}:{port}",
            f"--rdzv-id={job.job_id}", *args]


def _accelerate_args(nnodes: int, nproc: int, node_rank: int, host: str, port: int, job: Allocation | None,
                     nodes: Nodes | None) -> list[str]:
    # `--cpu --num_processes N` starts one process (accelerate#2741); --multi_gpu with gloo starts N.
    args = ["--num_processes", str(nproc * nnodes), "--num_machines", str(nnodes), "--mixed_precision", "no",
            "--dynamo_backend", "no"]
    if nproc * nnodes > 1:
        args.insert(0, "--multi_gpu")
    if job is None and nodes is None:
        return [*args, "--main_process_port", "0"]
    return [*args, "--machine_rank", str(node_rank), "--main_process_ip", host, "--main_process_port", str(port)]
