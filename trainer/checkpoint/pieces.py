"""A checkpoint as a dict of stateful pieces, and the one check of what changed since it was written."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from trainer.config import flatten
from trainer.errors import CheckpointError
from trainer.parallel import distributed
from trainer.parallel.distributed import DistEnv

FORMAT = 2
"""Version of the checkpoint layout: 2 is a dict of pieces (see :func:`capture`)."""


class Stateful(Protocol):
    """Anything with ``state_dict()``/``load_state_dict()``: modules, optimizers, scalers, our own."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def capture(pieces: Mapping[str, Stateful], meta: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint: every piece's state under its name, beside ``meta`` (what the file says
    about itself: config, classes, versions, epoch, step, history, for readers and tools).

    Pieces may run collectives in ``state_dict`` (every rank calls this, in the same order).
    """
    state = {"format": FORMAT, **meta}
    for name, piece in pieces.items():
        state[name] = piece.state_dict()
    return state


def restore(pieces: Mapping[str, Stateful], state: dict[str, Any], origin: Path) -> None:
    """Load every piece from ``state``; a piece the checkpoint lacks is named in the error."""
    missing = [name for name in pieces if name not in state]
    if state.get("format") != FORMAT or missing:
        raise CheckpointError(f"{origin} is a checkpoint of another format (format {state.get('format')}, "
                              f"missing {', '.join(missing) or '-'}); it can be evaluated, not resumed: "
                              "start a new log.name")
    for name, piece in pieces.items():
        piece.load_state_dict(state[name])


class RankSums:
    """Numbers each rank keeps and the run reports summed over ranks (meter sums, skip counts).

    Saved as every rank's list (a collective). With the same world size each rank gets its own
    back (bitwise the same sums later); otherwise rank 0 takes the totals and the others zeros,
    which keeps the sums over ranks.
    """

    def __init__(self, env: DistEnv, read: Callable[[], list[float]], write: Callable[[list[float]], None]) -> None:
        self.env, self.read, self.write = env, read, write

    def state_dict(self) -> dict[str, Any]:
        return {"per_rank": distributed.all_gather_objects(self.env, [float(v) for v in self.read()])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        per_rank: list[list[float]] = state["per_rank"]
        if len(per_rank) == self.env.world_size:
            self.write(per_rank[self.env.rank])
        else:
            totals = [sum(column) for column in zip(*per_rank)]
            self.write(totals if self.env.is_main else [0.0] * len(totals))


# ----------------------------------------------------------------------------- compatibility
NEUTRAL_KEYS = ("log.", "ckpt.", "dist.timeout_s", "dist.step_timeout_s", "dist.flight_recorder",
                "dist.find_unused_parameters", "data.num_workers",
                "data.persistent_workers", "data.pin_memory", "data.val_batch_size", "data.download",
                "data.cache_dir", "data.root")
"""Config keys (or prefixes) that do not change the training math: changing them keeps a resume exact."""


def changes_since(saved: dict[str, Any], current: dict[str, Any], saved_world: int, world: int,
                  defaults: dict[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """What differs between the checkpoint's run and this one (``key old -> new``), and the
    subset of those changes that give up bitwise identity with an uninterrupted run.

    A key the checkpoint's config lacks (saved before the key existed) counts as its value in
    ``defaults``: a new key's default keeps what the trainer did before it."""
    changes: list[str] = []
    inexact: list[str] = []
    if saved_world != world:
        changes.append(f"world size {saved_world} -> {world}")
        inexact.append("world size")
    old, new = {**flatten(defaults or {}), **flatten(saved)}, flatten(current)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changes.append(f"{key} {old.get(key)} -> {new.get(key)}")
            if not key.startswith(NEUTRAL_KEYS):
                inexact.append(key)
    return changes, inexact


def describe_changes(changes: list[str], inexact: list[str]) -> str:
    """One log line for :func:`changes_since`."""
    if not changes:
        return "same configuration as the checkpoint: the resumed run is bitwise identical to an uninterrupted one"
    verdict = (f"not bitwise identical to an uninterrupted run because of {', '.join(inexact)} "
               "(each sample is still seen once per epoch; the schedule follows progress)"
               if inexact else "bitwise identical to an uninterrupted run (none of these change the math)")
    return f"changed since the checkpoint: {'; '.join(changes)}; {verdict}"
