"""Checkpoint files: atomic writes, safe loads, retention, finding what to resume from, and the
checkpoint as a dict of stateful pieces with one compatibility check.

Layout under ``run_dir/checkpoints``: ``step_<global step>.pt`` files (the newest ``keep_last``
are kept), ``last.pt`` (the newest) and ``best.pt`` (the best by the configured metric). The
last two are hard links to a step file where the filesystem allows, so they cost no space.
A checkpoint holds only tensors and plain Python values: ``torch.load(weights_only=True)`` loads it.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch

from trainer import atomic, distributed
from trainer.config import flatten
from trainer.distributed import DistEnv
from trainer.errors import CheckpointError, first_line

log = logging.getLogger("trainer")

FORMAT = 2
"""Version of the checkpoint layout: 2 is a dict of pieces (see :func:`capture`)."""

STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that a crash at any moment leaves the old file intact.

    The bytes go to a temporary file in the same folder, are fsynced, then renamed over ``path``
    (see :func:`trainer.atomic.replacing`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic.replacing(path, durable=True) as file:
            torch.save(state, file)
    except BaseException as exc:
        cause = _os_error(exc)
        if cause is not None:
            raise CheckpointError(f"could not write checkpoint {path} ({cause.strerror or cause}); "
                                  "the previous checkpoint is untouched") from None
        raise


def link_atomic(source: Path, alias: Path) -> None:
    """Make ``alias`` (e.g. ``last.pt``) name the same file as ``source``, atomically."""
    tmp = atomic.temporary_name(alias)
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # filesystems without hard links: fall back to a copy
        shutil.copyfile(source, tmp)
    os.replace(tmp, alias)
    atomic.fsync_folder(alias.parent)


def step_files(folder: Path) -> list[Path]:
    """The ``step_*.pt`` files in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(folder: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` step files, and temp files a killed writer left."""
    old = step_files(folder)[:-keep_last] if keep_last > 0 else []
    old += atomic.leftovers(folder)
    for path in old:
        path.unlink(missing_ok=True)
    return old


def latest(run_dir: Path) -> Path | None:
    """The checkpoint a ``resume: auto`` run continues from, if any."""
    last = checkpoint_dir(run_dir) / "last.pt"
    if last.is_file():
        return last
    steps = step_files(checkpoint_dir(run_dir))
    return steps[-1] if steps else None


def load_for_resume(path: Path, fall_back: bool, announce: bool) -> tuple[dict[str, Any], Path]:
    """Load ``path``; if it cannot be read and ``fall_back``, the newest older step file that can.

    One warning line (when ``announce``) names the unreadable files and the one used instead.
    Without a readable one: :class:`CheckpointError`, never a silent fresh start.
    """
    try:
        return load(path), path
    except CheckpointError as exc:
        if not fall_back:
            raise
        problem = str(exc)
    failed = path.stat().st_ino if path.exists() else None
    unreadable: list[str] = []
    for older in reversed(step_files(path.parent)):
        if older.stat().st_ino == failed:  # last.pt is a hard link to the newest step file
            continue
        try:
            state = load(older)
        except CheckpointError:
            unreadable.append(older.name)
            continue
        if announce:
            log.warning("%s%s; falling back to %s", problem, _also(unreadable), older)
        return state, older
    raise CheckpointError(f"{problem}; no older readable checkpoint in {path.parent}{_also(unreadable)}: "
                          "move the folder away to start afresh, or point ckpt.resume at a good checkpoint")


def _also(names: list[str]) -> str:
    return f" ({', '.join(names)} unreadable too)" if names else ""


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, refusing anything but tensors and plain values."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported operand" in str(exc):  # bytes that are no pickle stream: cut or not a checkpoint
            raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a checkpoint") from None
        text = str(exc).split("WeightsUnpickler error:")[-1]
        detail = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "") or first_line(text)
        raise CheckpointError(f"refusing to load {path}: it holds a pickled Python object, not just tensors "
                              f"({detail}); only load checkpoints you trust, re-saved as plain tensors") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a checkpoint "
                              f"({first_line(exc)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this trainer (no 'model' entry)")
    return state


def check_classes(state: dict[str, Any], classes: list[str], origin: Path) -> None:
    """Refuse a checkpoint trained on other classes than the data set's."""
    if state.get("classes") != classes:
        raise CheckpointError(f"{origin} was trained on classes {state.get('classes')}, "
                              f"but the data has {classes}; check data.source and data.root")


WEIGHTS = ("auto", "model", "ema")
"""Which weights of a checkpoint to use for evaluation and prediction (``--weights``)."""


def select_weights(state: dict[str, Any], which: str, origin: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The checkpoint's model weights or its EMA's, and which it was.

    ``auto`` takes the EMA when the run chose its best checkpoint on a ``val_ema/`` metric.
    """
    ema = (state.get("step") or {}).get("ema")
    if which == "auto":
        metric = (state.get("config") or {}).get("ckpt", {}).get("metric", "")
        which = "ema" if ema is not None and metric.startswith("val_ema/") else "model"
    if which == "ema":
        if ema is None:
            raise CheckpointError(f"{origin} holds no EMA weights (trained with train.ema_decay=0); "
                                  "use --weights model")
        return which, ema["model"]
    return which, state["model"]


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], origin: Path) -> None:
    """Load weights strictly; on any mismatch, name the differing keys and shapes in one line."""
    mismatch = weight_mismatch(model, weights)
    if mismatch:
        raise CheckpointError(f"{origin} does not match the model ({mismatch}); "
                              "check model.name and the number of classes")
    model.load_state_dict(weights)


def weight_mismatch(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> str | None:
    """The missing, unexpected and differently shaped keys of ``weights``, or None if they fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(weights)) if weights[k].shape != own[k].shape]
    parts = [f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
             for label, items in (("missing", missing), ("unexpected", unexpected),
                                  ("shape checkpoint vs model", shapes)) if items]
    return "; ".join(parts) or None


# ----------------------------------------------------------------------------- stateful pieces
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
NEUTRAL_KEYS = ("log.", "ckpt.", "dist.timeout_s", "dist.find_unused_parameters", "data.num_workers",
                "data.persistent_workers", "data.pin_memory", "data.val_batch_size", "data.download",
                "data.cache_dir", "data.root")
"""Config keys (or prefixes) that do not change the training math: changing them keeps a resume exact."""


def changes_since(saved: dict[str, Any], current: dict[str, Any], saved_world: int,
                  world: int) -> tuple[list[str], list[str]]:
    """What differs between the checkpoint's run and this one (``key old -> new``), and the
    subset of those changes that give up bitwise identity with an uninterrupted run."""
    changes: list[str] = []
    inexact: list[str] = []
    if saved_world != world:
        changes.append(f"world size {saved_world} -> {world}")
        inexact.append("world size")
    old, new = flatten(saved), flatten(current)
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


# ----------------------------------------------------------------------------- history
def rewrite_lines(path: Path, lines: list[str]) -> None:
    """Replace ``path`` with ``lines`` atomically (metrics.jsonl from the checkpoint's history)."""
    with atomic.replacing(path) as file:
        file.write("".join(line + "\n" for line in lines).encode())


def _os_error(exc: BaseException | None) -> OSError | None:
    """``exc`` or the OSError behind it: torch.save reports a failed write (ENOSPC, EIO...) as the
    RuntimeError of closing its zip writer ("unexpected pos ..."), with the OSError as its context."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
