"""Sharded checkpoints: a folder ``step_<n>/`` per save, each rank writing its own shards with
``torch.distributed.checkpoint`` (DCP), beside ``pieces.pt`` (the small pieces, written by rank 0).

A save goes to a hidden temporary folder; once every rank's shards and DCP's ``.metadata`` are on
disk (DCP's save ends with the coordinator writing the metadata, after every rank wrote), rank 0
records the SHA-256 of every file in ``pieces.pt`` and renames the folder into place, so a folder
named ``step_<n>`` is always complete. ``last.ptr`` and ``best.ptr`` name a folder (replaced
atomically). At load every file must match its digest: a missing, truncated or altered shard is
refused like any damaged checkpoint (and a resume falls back to the previous one).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from trainer.checkpoint import atomic
from trainer.errors import CheckpointError, disk_problem

PIECES = "pieces.pt"
"""The small pieces of a sharded checkpoint (position, record, RNG...), with the files' digests."""
SHARDS = "shards"
"""Where ``pieces.pt`` keeps ``{file name: SHA-256}`` of the folder's DCP files."""
POINTER = ".ptr"
"""``last.ptr`` / ``best.ptr``: a text file holding the name of a checkpoint folder."""
TENSORS = {"model": ("model",), "optimizer": ("optimizer",), "ema": ("step", "ema", "model")}
"""The large states DCP writes shard by shard, and where each lives in a checkpoint's state."""
IN_SHARDS = "in shards"
"""What ``pieces.pt`` holds in the place of a large state."""
FOLDER = "sharded folder"
"""Where a state loaded without its large states keeps the folder they are in."""


def is_sharded(path: Path) -> bool:
    """Whether ``path`` names a sharded checkpoint: its folder or a pointer to one."""
    return path.is_dir() or path.suffix == POINTER


def resolve(path: Path) -> Path:
    """The folder ``path`` names (itself, or the one a pointer file holds)."""
    if path.suffix != POINTER:
        return path
    try:
        name = path.read_text().strip()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint pointer {path} ({disk_problem(exc, path)})") from None
    if not name or "/" in name or name.startswith("."):
        raise CheckpointError(f"checkpoint pointer {path} is damaged (it names {name!r}, not a step folder)")
    return path.parent / name


def point(alias: Path, folder: Path) -> None:
    """Make ``alias`` (``last.ptr``) name ``folder``, atomically and durably."""
    with atomic.replacing(alias, durable=True) as file:
        file.write(f"{folder.name}\n".encode())


def split(state: dict[str, Any]) -> dict[str, Any]:
    """Take the large states out of ``state`` (each replaced by :data:`IN_SHARDS`): what DCP writes, by name."""
    tensors = {}
    for name, where in TENSORS.items():
        parent = _get(state, where[:-1])
        if isinstance(parent, dict) and parent.get(where[-1]) is not None:
            tensors[name], parent[where[-1]] = parent[where[-1]], IN_SHARDS
    return tensors


def join(state: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """Put the large states back where :func:`split` took them from."""
    for name, value in tensors.items():
        _get(state, TENSORS[name][:-1])[TENSORS[name][-1]] = value
    return state


def held(state: dict[str, Any]) -> list[str]:
    """Which large states a checkpoint's small state says its folder holds."""
    return [name for name, where in TENSORS.items() if _get(state, where) == IN_SHARDS]


def _get(state: Any, where: tuple[str, ...]) -> Any:
    for key in where:
        state = state.get(key) if isinstance(state, dict) else None
    return state


# ----------------------------------------------------------------------------- saving
def temporary_folder(folder: Path, step: int) -> Path:
    """Rank 0's empty folder for the save of ``step`` (hidden: never taken for a checkpoint)."""
    tmp = atomic.temporary_name(folder / step_name(step))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def step_name(step: int) -> str:
    return f"step_{step:09d}"


def write_shards(tensors: dict[str, Any], tmp: Path) -> None:
    """Every rank: its shards of ``tensors`` into ``tmp`` (a collective; DCP writes the metadata last).

    A tensor every rank holds whole (BatchNorm's running statistics, which each rank updates from
    its own batches between evaluations) is written from the lowest rank, as the single file
    holds rank 0's: a resume on as many ranks continues rank 0's statistics bitwise."""
    try:
        dcp.save(tensors, checkpoint_id=str(tmp), planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))
    except Exception as exc:  # DCP gathers every rank's failure into one CheckpointException
        raise CheckpointError(f"could not write the shards of checkpoint {tmp.parent} "
                              f"({' '.join(str(exc).split())[:300]}); free space or fix the folder, "
                              "then run the same command again (ckpt.resume=auto)") from None


def write_shards_later(tensors: dict[str, Any], tmp: Path, group: Any) -> Any:
    """:func:`write_shards` in the background, from a copy of ``tensors`` taken before it returns
    (training may change them at once); the returned future's ``result()`` waits for it. ``group``:
    a process group the training does not use (the background save runs collectives on it)."""
    try:
        writing = dcp.async_save(tensors, checkpoint_id=str(tmp), process_group=group,
                                 planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))
    except Exception as exc:
        raise CheckpointError(f"could not start writing the shards of checkpoint {tmp.parent} "
                              f"({' '.join(str(exc).split())[:300]})") from None
    return getattr(writing, "upload_completion", writing)


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file DCP wrote in ``folder``."""
    return {path.name: file_digest(path) for path in sorted(folder.iterdir()) if path.name != PIECES}


def file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            hasher.update(chunk)
    return hasher.hexdigest()


def publish(tmp: Path, folder: Path, step: int, best: bool, save_pieces: Callable[[Path], None]) -> Path:
    """Rank 0, after every rank's shards are written: ``pieces.pt`` (with the shards' digests), the
    folder renamed into place, ``last.ptr`` (and ``best.ptr``) pointed at it. Returns the folder."""
    save_pieces(tmp / PIECES)
    target = folder / step_name(step)
    if target.exists():  # the same step saved again (a stop right after a resume): the old one goes
        old = atomic.temporary_name(folder / f"{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, target)
    atomic.fsync_folder(folder)
    point(folder / f"last{POINTER}", target)
    if best:
        point(folder / f"best{POINTER}", target)
    return target


# ----------------------------------------------------------------------------- loading
def check_files(folder: Path, state: dict[str, Any], part: tuple[int, int] = (0, 1)) -> None:
    """Refuse a folder whose DCP files differ from the digests ``pieces.pt`` recorded; ``part``
    ``(i, n)`` checks every n-th file from the i-th (the ranks of a resume share the reading)."""
    recorded = state.pop(SHARDS, None)
    if not isinstance(recorded, dict) or not recorded:
        raise CheckpointError(f"checkpoint {folder} is damaged: {PIECES} records no shard digests")
    index, count = part
    for name, expected in sorted(recorded.items())[index::count]:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is damaged: its shard {name} is missing; "
                                  "use an older checkpoint")
        if file_digest(path) != expected:
            raise CheckpointError(f"checkpoint {folder} is damaged: its shard {name} does not match its digest "
                                  "(truncated, or a flipped bit); use an older checkpoint")


def shapes(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The shapes of the large state ``name`` as the folder's metadata records them (meta tensors),
    to compare with a model before loading."""
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    prefix = f"{name}."
    return {key[len(prefix):]: torch.empty(tuple(item.size), dtype=item.properties.dtype, device="meta")
            for key, item in metadata.state_dict_metadata.items()
            if key.startswith(prefix) and hasattr(item, "size")}


def read_shards(templates: dict[str, Any], folder: Path) -> None:
    """Every rank: fill ``templates`` (this run's sharded states) from the folder, resharded to
    this run's world size (a collective)."""
    try:
        dcp.load(templates, checkpoint_id=str(folder))
    except Exception as exc:
        raise CheckpointError(f"cannot load the shards of checkpoint {folder} "
                              f"({' '.join(str(exc).split())[:300]})") from None


def read_whole(folder: Path, names: list[str]) -> dict[str, Any]:
    """The large states ``names`` whole, in this process alone (no process group): for the tools
    and for a resume without sharding."""
    loaded: dict[str, Any] = {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no group: as meant
            # as torch's dcp_to_torch_save does: the public load fills only the keys it is given
            _load_state_dict(loaded, storage_reader=dcp.FileSystemReader(str(folder)),
                             planner=_EmptyStateDictLoadPlanner(keys=set(names)), no_dist=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read the shards of checkpoint {folder} "
                              f"({' '.join(str(exc).split())[:300]})") from None
    return loaded
