"""Several nodes without SLURM: the launcher's own flags, or a Kubeflow pod's variables.

Either way every node runs one torchrun, all of them meeting at a c10d rendezvous endpoint; the
node given rank 0 hosts the rendezvous store there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from trainer.errors import EnvironmentProblem

DEFAULT_RDZV_ID = "launcher"


@dataclass(frozen=True)
class Nodes:
    """How many nodes, which one this is, and where they meet."""

    nnodes: str
    """``N``, or torchrun's elastic range ``MIN:MAX``."""
    min_nodes: int
    max_nodes: int
    host: str
    port: int
    rdzv_id: str
    node_rank: int | None
    source: str
    """Where these came from, for the plan's reasons."""
    nproc_per_node: int | None = None


def nodes_from_flags(nnodes: str | None, node_rank: int | None, endpoint: str | None,
                     rdzv_id: str | None) -> Nodes | None:
    """The nodes the command-line flags describe; None when none of them is given."""
    if nnodes is None and node_rank is None and endpoint is None and rdzv_id is None:
        return None
    low, high = parse_nnodes(nnodes or "1", "--nnodes")
    if endpoint is None:
        if high > 1:
            raise EnvironmentProblem(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, an address of node 0 "
                                     "that every node reaches (the same on every node)")
        return None  # one node: the standalone rendezvous
    host, port = parse_endpoint(endpoint, "--rdzv-endpoint")
    if node_rank is not None and not 0 <= node_rank < high:
        raise EnvironmentProblem(f"--node-rank {node_rank} is not in 0..{high - 1} for --nnodes {nnodes}")
    return Nodes(nnodes or "1", low, high, host, port, rdzv_id or DEFAULT_RDZV_ID, node_rank,
                 "--nnodes/--rdzv-endpoint")


def pytorchjob(environ: dict[str, str] | None = None) -> Nodes | None:
    """The nodes of a Kubeflow job, read from the variables its operator sets in each pod.

    Both set ``PET_NNODES`` (``N``, or ``MIN:MAX`` with an elastic policy), ``PET_NPROC_PER_NODE``
    and ``PET_NODE_RANK``. A Trainer v2 TrainJob (on JobSet) gives the rendezvous as
    ``PET_MASTER_ADDR``/``PET_MASTER_PORT`` and nothing else; a v1 PyTorchJob as
    ``MASTER_ADDR``/``MASTER_PORT`` (the master pod's service, with ``RANK``, the pod's index), or
    ``PET_RDZV_ENDPOINT``/``PET_RDZV_ID`` with an elastic policy.
    """
    env = os.environ if environ is None else environ
    if "PET_NNODES" not in env:
        return None
    low, high = parse_nnodes(env["PET_NNODES"], "PET_NNODES")
    source = "Kubernetes PyTorchJob (PET_* variables)"
    if "PET_RDZV_ENDPOINT" in env:
        host, port = parse_endpoint(env["PET_RDZV_ENDPOINT"], "PET_RDZV_ENDPOINT")
        node_rank = None
    elif "PET_MASTER_ADDR" in env and "PET_MASTER_PORT" in env:
        host, port = parse_endpoint(f"{env['PET_MASTER_ADDR']}:{env['PET_MASTER_PORT']}",
                                    "PET_MASTER_ADDR:PET_MASTER_PORT")
        node_rank = int(env.get("PET_NODE_RANK", "0"))
        source = "Kubeflow Trainer v2 TrainJob (PET_* variables)"
    elif "MASTER_ADDR" in env and "MASTER_PORT" in env:
        host, port = parse_endpoint(f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}", "MASTER_ADDR:MASTER_PORT")
        node_rank = int(env.get("PET_NODE_RANK", env.get("RANK", "0")))
    else:
        raise EnvironmentProblem("PET_NNODES is set (a Kubeflow job?) but neither PET_MASTER_ADDR/PET_MASTER_PORT, "
                                 "MASTER_ADDR/MASTER_PORT nor PET_RDZV_ENDPOINT is; give the job a Master replica "
                                 "or an elasticPolicy")
    nproc = env.get("PET_NPROC_PER_NODE", "")
    return Nodes(env["PET_NNODES"], low, high, host, port, env.get("PET_RDZV_ID", "pytorchjob"), node_rank,
                 source, int(nproc) if nproc.isdigit() else None)


def parse_nnodes(value: str, name: str) -> tuple[int, int]:
    """``"2"`` -> (2, 2); ``"1:2"`` -> (1, 2)."""
    low, _, high = value.partition(":")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        raise EnvironmentProblem(f"{name} {value!r} must be a number of nodes N or a range MIN:MAX, e.g. 2 or 1:2") \
            from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise EnvironmentProblem(f"{name} {value!r}: need 1 <= MIN <= MAX")
    return bounds


def parse_endpoint(value: str, name: str) -> tuple[str, int]:
    """``"10.0.0.1:29400"`` -> ("10.0.0.1", 29400)."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise EnvironmentProblem(f"{name} {value!r} must be HOST:PORT, e.g. node0.example.org:29400")
    return host, int(port)
