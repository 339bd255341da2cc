"""Seeding and capturing/restoring every random number generator a rank uses."""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import torch

from trainer.parallel import distributed
from trainer.parallel.distributed import DistEnv


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Each rank's own seed (dropout and stochastic-depth masks differ between ranks); ``step``
    re-derives one at a resume where the saved per-rank states do not fit the new world size."""
    return (seed + rank + 1_000_003 * step) % 2**63


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (safe for ``weights_only`` loads)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RankRng:
    """Every rank's RNG states as a checkpoint piece (saving is a collective).

    Restored rank by rank when the world size is unchanged (exact); otherwise each rank is
    seeded with :func:`rank_seed` at ``step()``, so the same resume is reproducible.
    """

    def __init__(self, env: DistEnv, seed: int, step: Callable[[], int]) -> None:
        self.env, self.seed, self.step = env, seed, step

    def state_dict(self) -> dict[str, Any]:
        return {"per_rank": distributed.all_gather_objects(self.env, capture_rng())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["per_rank"]) == self.env.world_size:
            restore_rng(state["per_rank"][self.env.rank])
        else:
            seed_everything(rank_seed(self.seed, self.env.rank, self.step()))
