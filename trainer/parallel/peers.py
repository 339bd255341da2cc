"""After a collective fails because another rank is gone: say which one, in one line.

A host that dies or drops off the network shows up on the survivors as a gloo transport error
("Connection reset by peer", or a timeout after ``dist.timeout_s``) that names no rank. Each
survivor then checks in at the rendezvous store (on node 0) and waits a few seconds for the others;
the ranks that never check in are the lost ones.
"""

from __future__ import annotations

import os
import re
import time
from datetime import timedelta

import torch.distributed as dist

from trainer.parallel.distributed import DistEnv

CENSUS_WAIT_S = 5.0


def is_peer_failure(exc: BaseException) -> bool:
    """A collective or store operation that failed because a peer stopped answering."""
    return isinstance(exc, dist.DistError) or "gloo/transport" in str(exc)


def lost_ranks(env: DistEnv, wait_s: float = CENSUS_WAIT_S) -> list[int] | None:
    """The ranks that do not check in at the store within ``wait_s``; None if the store is gone too."""
    store = env.store
    keys = [f"lost_peer_census/{rank}" for rank in range(env.world_size)]
    deadline = time.monotonic() + wait_s
    try:
        store.set_timeout(timedelta(seconds=wait_s))
        store.set(keys[env.rank], "here")
        while True:
            missing = [rank for rank, key in enumerate(keys) if not store.check([key])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except (RuntimeError, dist.DistError, OSError):
        return None


def describe(env: DistEnv, exc: BaseException) -> str:
    """One line: who is lost, what failed, what to do."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    detail = re.sub(r"^\[[^\]]*\] ", "", first).split(". ")[0]  # without gloo's source file and advice
    lost = lost_ranks(env)
    if lost is None:
        who = (f"lost node 0: the rendezvous store it hosts ({os.environ.get('MASTER_ADDR')}:"
               f"{os.environ.get('MASTER_PORT')}) does not answer either")
    elif lost:
        per_node = env.topology.local_world_size
        who = "lost " + ", ".join(f"rank {rank} (node {rank // per_node})" for rank in lost)
    else:
        who = "every rank still answers (a transient network failure?)"
    return (f"{who}: a collective failed ({detail}); that host died, hangs or lost its network. "
            "Start the run again: it resumes from its last checkpoint")
