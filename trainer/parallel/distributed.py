"""Who am I in the job (rank, local rank, world size), which device and backend, init and teardown.

The Worker reads only the standard variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) that python, torchrun, accelerate and our launcher set, and falls
back to ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` under a plain ``srun``.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from trainer.errors import EnvironmentProblem
from trainer.parallel import openmp, slurm

log = logging.getLogger(__name__)


SLURM_SOURCE = "SLURM_PROCID/SLURM_NTASKS"
"""Topology.source of a process started by plain ``srun`` (one task per process, no torchrun)."""


@dataclass(frozen=True)
class Topology:
    """This process's place in the job, as read from the environment."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    source: str = "single process"


@dataclass(frozen=True)
class DistEnv:
    """The resolved process: its topology, device and (when distributed) backend.

    ``control`` is a gloo group over every rank for host-side agreement (stop flags, objects,
    barriers): on CPU tensors it never waits for, or copies from, a CUDA stream. It is a group
    of its own on every backend, so the path CI runs on CPU is the one NCCL jobs run.
    """

    topology: Topology
    device: torch.device
    backend: str | None
    control: Any = None
    store: Any = None
    """The rendezvous store (on node 0), for a census of the ranks after a failure (trainer/peers.py)."""

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def is_main(self) -> bool:
        return self.topology.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def discover(environ: dict[str, str] | None = None) -> Topology:
    """Read the topology from torchrun-style variables, else from SLURM's, else single process.

    torchrun inside an sbatch job sets both (with ``SLURM_NTASKS=1``), so the standard ones win.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return Topology(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world,
                        int(env.get("LOCAL_WORLD_SIZE", world)), "RANK/WORLD_SIZE")
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        world = int(env["SLURM_NTASKS"])
        per_node = int(env.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0)
        return Topology(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world,
                        per_node or world, SLURM_SOURCE)
    return Topology()


def select_device(requested: str, topology: Topology) -> torch.device:
    """CUDA (one device per local rank), else MPS (single process only), else CPU."""
    cuda, mps = torch.cuda.is_available(), _mps_available()
    if requested == "cuda" and not cuda:
        raise EnvironmentProblem("dist.device=cuda but no CUDA device is visible; use dist.device=auto or cpu")
    if requested == "mps" and not mps:
        raise EnvironmentProblem("dist.device=mps but MPS is not available here; use dist.device=auto or cpu")
    kind = requested if requested != "auto" else "cuda" if cuda else "mps" if mps else "cpu"
    if kind == "cuda":
        count = torch.cuda.device_count()
        if count == 1 and topology.source == SLURM_SOURCE:  # srun binds a GPU per task: its own device 0
            return torch.device("cuda", 0)
        if topology.local_rank >= count:
            raise EnvironmentProblem(
                f"local rank {topology.local_rank} has no GPU: {count} visible for "
                f"{topology.local_world_size} processes per node; start at most {count} per node")
        return torch.device("cuda", topology.local_rank)
    if kind == "mps":
        if topology.world_size > 1:
            if requested == "mps":
                raise EnvironmentProblem("MPS supports one process only (no process groups); "
                                         "run a single process or use dist.device=cpu")
            kind = "cpu"
        else:
            return torch.device("mps")
    return torch.device("cpu")


def setup(device: str = "auto", backend: str = "auto", timeout_s: float = 300.0,
          before_group: Callable[[str], None] | None = None) -> DistEnv:
    """Resolve this process and, when the job has several, join the process group;
    ``before_group(backend)`` runs just before it is made (e.g. to set torch's variables)."""
    topology = discover()
    dev = select_device(device, topology)
    if dev.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(openmp.threads_per_process(os.environ, openmp.usable_cores(), topology.local_world_size))
    launched = topology.source != Topology.source  # by torchrun, accelerate or srun
    if topology.world_size == 1 and not (launched and backend != "auto"):  # a named backend: a 1-rank group
        return DistEnv(topology, dev, None)
    chosen = ("nccl" if dev.type == "cuda" else "gloo") if backend == "auto" else backend
    if chosen == "nccl" and dev.type != "cuda":
        raise EnvironmentProblem("dist.backend=nccl needs CUDA devices; use dist.backend=gloo on CPU")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if before_group is not None:
        before_group(chosen)
    store = _rendezvous_store(topology, timeout_s)
    dist.init_process_group(chosen, store=store, rank=topology.rank,
                            world_size=topology.world_size, timeout=timedelta(seconds=timeout_s),
                            device_id=dev if dev.type == "cuda" else None)
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return DistEnv(topology, dev, chosen, control, store)


def _rendezvous_store(topology: Topology, timeout_s: float) -> dist.Store:
    """A TCPStore namespaced by torchrun's restart count.

    Restarted workers (``torchrun --max-restarts``) reuse the agent's store, where the dead
    workers' keys still live (pytorch#135712); a per-attempt prefix gives each attempt a clean one.
    """
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    elif (job := slurm.allocation()) is not None:
        host, port = job.rendezvous()
    else:
        raise EnvironmentProblem(f"WORLD_SIZE={topology.world_size} but MASTER_ADDR/MASTER_PORT are unset; "
                                 "start with torchrun or python -m launcher")
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    try:
        store = dist.TCPStore(host, port, topology.world_size,
                              is_master=topology.rank == 0 and not agent_hosts_store,
                              timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, OSError) as exc:
        reason = str(exc).splitlines()[0]
        raise EnvironmentProblem(f"cannot open the rendezvous store at {host}:{port} ({reason}); "
                                 "is the port busy? choose another MASTER_PORT") from None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"attempt_{attempt}", store)


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op in a single process)."""
    if env.is_distributed:
        dist.barrier(group=env.control)


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=env.control)
    return box[0]


def all_gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not env.is_distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj, group=env.control)
    return out


def any_rank(env: DistEnv, flags: list[bool]) -> list[bool]:
    """Each flag, true on every rank when it is true on at least one (a collective: call it on all)."""
    if not env.is_distributed:
        return flags
    values = torch.tensor([float(flag) for flag in flags])
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=env.control)
    return [bool(value) for value in values.tolist()]


def agree_on_failure(env: DistEnv, failed: bool, more: bool = False) -> tuple[int | None, bool]:
    """After work that may fail on some ranks alone (a forward pass out of memory): the highest rank
    where it failed (None where none did) and whether any rank has more to do. One blocking
    all-reduce of three numbers over the control group: call it on every rank, as often."""
    if not env.is_distributed:
        return (env.rank if failed else None), more
    values = torch.tensor([float(failed), float(env.rank if failed else -1), float(more)])
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=env.control)
    any_failed, rank, any_more = values.tolist()
    return (int(rank) if any_failed else None), bool(any_more)


class LaggedAgreement:
    """:func:`any_rank` for flags polled in the training loop, without waiting for the other ranks.

    Each :meth:`poll` starts a non-blocking all-reduce of this rank's flags over the control group
    and returns the outcome of the previous poll, which had at least a step to arrive. Every rank
    polls at the same steps, so every rank reads the same outcome at the same step: a decision one
    poll late, for the price of a background transfer instead of a round trip.

    A poll costs about :data:`POLL_COST_S` of CPU. With steps so short that this would exceed
    :data:`POLL_BUDGET` of their time, ranks poll only every ``every`` steps: each proposes an
    interval from its own step time, and the largest proposal travels with the flags, so all
    ranks adopt it at the same step. A signal still takes effect within about
    ``POLL_COST_S / POLL_BUDGET`` seconds, or one step when steps are longer than that.
    """

    POLL_COST_S = 5e-4
    POLL_BUDGET = 0.01
    MAX_EVERY = 100

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.every = 1
        self._steps = 0
        self._last_poll = time.perf_counter()
        self._pending: tuple[Any, torch.Tensor] | None = None

    def poll(self, flags: list[bool]) -> list[bool]:
        if not self.env.is_distributed:
            return flags
        self._steps += 1
        if self._steps < self.every:
            return [False] * len(flags)
        now = time.perf_counter()
        step_s = (now - self._last_poll) / self._steps
        self._steps, self._last_poll = 0, now
        outcome = self.settle(len(flags))
        proposal = min(self.MAX_EVERY, max(1, math.ceil(self.POLL_COST_S / (self.POLL_BUDGET * max(step_s, 1e-9)))))
        values = torch.tensor([float(flag) for flag in flags] + [float(proposal)])
        work = dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.env.control, async_op=True)
        self._pending = (work, values)
        return outcome

    def quiesce(self) -> None:
        """Wait for the poll in flight, if any, and keep its outcome for the next poll or settle.

        For torch.profiler: starting or stopping it while this all-reduce still ran on gloo's
        threads corrupted the heap in 2-process runs (a ``malloc(): ... corrupted`` abort a few
        steps later, about one run in three). A failed collective is not raised here: the next
        :meth:`settle` or :meth:`poll` waits on it again and raises.
        """
        if self._pending is None:
            return
        try:
            self._pending[0].wait()
        except RuntimeError:  # DistBackendError and gloo's errors derive from it
            pass

    def settle(self, count: int) -> list[bool]:
        """Wait for the poll in flight, if any, adopt its interval and return its flags (all false if none)."""
        if self._pending is None:
            return [False] * count
        work, values = self._pending
        self._pending = None
        work.wait()
        *flags, every = values.tolist()
        self.every = int(every)
        return [bool(value) for value in flags]


def teardown(env: DistEnv) -> None:
    """Leave the process group cleanly so no gloo thread outlives the interpreter."""
    if not env.is_distributed or not dist.is_initialized():
        return
    gc.collect()
    try:
        barrier(env)
    finally:
        dist.destroy_process_group()


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())
