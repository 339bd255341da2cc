"""Checkpoint files on disk: atomic writes, safe loads, retention, and what to resume from.

Layout under ``run_dir/checkpoints``: ``step_<global step>.pt`` files (the newest ``keep_last``
are kept), ``last.pt`` (the newest) and ``best.pt`` (the best by the configured metric). The
last two are hard links to a step file where the filesystem allows, so they cost no space.
A checkpoint holds only tensors and plain Python values: ``torch.load(weights_only=True)`` loads it.
A sharded run writes ``step_<global step>/`` folders and ``last.ptr``/``best.ptr`` pointers instead
(see :mod:`trainer.checkpoint.sharded`); retention, ``latest`` and the fallback treat both alike.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from trainer.checkpoint import atomic, digest, sharded
from trainer.errors import CheckpointError, StorageError, disk_fix, disk_problem, first_line, stopped_by_write
from trainer.parallel.sharded import keyed_by_position

log = logging.getLogger("trainer")

STEP_FILE = re.compile(r"^step_(\d+)(\.pt)?$")
"""A step checkpoint: a file ``step_<n>.pt`` or a sharded folder ``step_<n>``."""
ALIASES = ("last.pt", f"last{sharded.POINTER}")
Agree = Callable[[str | None], str | None]


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` and the digest of its contents to ``path`` so that a crash at any moment
    leaves the old file intact.

    The bytes go to a temporary file in the same folder, are fsynced, then renamed over ``path``
    (see :func:`trainer.checkpoint.atomic.replacing`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic.replacing(path, durable=True) as file:
            torch.save({**state, digest.KEY: digest.content_digest(state)}, file)
    except BaseException as exc:
        cause = _os_error(exc)
        if cause is not None:
            raise CheckpointError(stopped_by_write(f"checkpoint {path}", cause, path)) from None
        raise


def save_step(state: dict[str, Any], folder: Path, step: int, best: bool, keep_last: int) -> Path:
    """A run's save: ``step_<step>.pt`` atomically, then ``last.pt`` (and ``best.pt``) pointed at
    it, then :func:`prune`. A kill at any moment leaves every checkpoint name on a complete file,
    and :func:`latest` finds the newest one. Returns the step file."""
    path = folder / f"step_{step:09d}.pt"
    save_atomic(state, path)
    try:
        link_atomic(path, folder / "last.pt")
        if best:
            link_atomic(path, folder / "best.pt")
        prune(folder, keep_last)
    except OSError as exc:
        raise CheckpointError(f"wrote {path} but could not point last.pt at it ({disk_problem(exc, folder)}); "
                              f"{disk_fix(exc)} and run the same command again (ckpt.resume=auto continues "
                              "from the newest step file)") from None
    return path


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
    """The step checkpoints (``step_*.pt`` files and ``step_*`` folders) in ``folder``, oldest first
    (a file and a folder of one step: the folder last)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p.is_dir(), p) for p in folder.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for *_, p in sorted(found)]


def prune(folder: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints (never a folder ``last.ptr`` or
    ``best.ptr`` names), and the temporary files and folders a killed writer left."""
    named = {_named(folder / f"{alias}{sharded.POINTER}") for alias in ("last", "best")}
    old = [p for p in (step_files(folder)[:-keep_last] if keep_last > 0 else []) if p not in named]
    old += atomic.leftovers(folder)
    for path in old:
        if path.is_dir():  # hidden first: a kill during the removal leaves no half folder under a step's name
            doomed = path if path.name.startswith(".") else atomic.temporary_name(path)
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return old


def _named(pointer: Path) -> Path | None:
    try:
        return sharded.resolve(pointer) if pointer.is_file() else None
    except CheckpointError:
        return None


def latest(run_dir: Path) -> Path | None:
    """The checkpoint a ``resume: auto`` run continues from, if any: ``last.pt`` (or ``last.ptr``),
    unless it names an older step checkpoint than the newest (a save killed between writing a step
    and pointing ``last`` at it, or a run that went on in the other form)."""
    folder = checkpoint_dir(run_dir)
    steps = step_files(folder)
    aliases = [alias for alias in (folder / name for name in ALIASES) if alias.is_file()]
    for alias in aliases:
        if steps and _same(alias, steps[-1]):
            return alias
    for alias in aliases:  # a copy (no hard links), or its step pruned: it names no older step, and is used
        if not any(_same(alias, step) for step in steps[:-1]):
            return alias
    return steps[-1] if steps else None


def _same(a: Path, b: Path) -> bool:
    """Whether two names (a step, ``last.pt``, ``last.ptr``) are one checkpoint."""
    return (identity := _identity(a)) is not None and identity == _identity(b)


def _identity(path: Path) -> tuple[str, Any] | None:
    if path.suffix == sharded.POINTER:
        path = _named(path) or path
    if path.is_dir():
        return "folder", path.resolve()
    return ("file", path.stat().st_ino) if path.is_file() else None


def load_for_resume(path: Path, fall_back: bool, announce: bool, whole: bool = True,
                    part: tuple[int, int] = (0, 1), agree: Agree = lambda problem: problem
                    ) -> tuple[dict[str, Any], Path]:
    """Load ``path``; if it cannot be read and ``fall_back``, the newest older step checkpoint that can.

    One warning line (when ``announce``) names the unreadable files and the one used instead.
    Without a readable one: :class:`CheckpointError`, never a silent fresh start. Not ``whole``: a
    sharded checkpoint's large states stay in its folder (checked, not loaded; see :func:`load`).
    The ranks of a sharded resume each check a ``part`` of a folder's files and ``agree`` (a
    collective: the first problem any rank found, on every rank) on each checkpoint tried.
    """
    state, problem = _attempt(path, whole, part, agree)
    if problem is None:
        return state, path
    if not fall_back:
        raise CheckpointError(problem)
    unreadable: list[str] = []
    for older in reversed(step_files(path.parent)):
        if _same(older, path):  # last.pt is a hard link to the newest step file, last.ptr names it
            continue
        state, failed = _attempt(older, whole, part, agree)
        if failed is not None:
            unreadable.append(older.name)
            continue
        if announce:
            log.warning("%s%s; falling back to %s", problem, _also(unreadable), older)
        return state, older
    raise CheckpointError(f"{problem}; no older readable checkpoint in {path.parent}{_also(unreadable)}: "
                          "move the folder away to start afresh, or point ckpt.resume at a good checkpoint")


def _attempt(path: Path, whole: bool, part: tuple[int, int], agree: Agree) -> tuple[Any, str | None]:
    """``path`` loaded, or the problem (agreed between the ranks) that stopped it."""
    try:
        state, problem = load(path, whole, part), None
    except CheckpointError as exc:
        state, problem = None, str(exc)
    return state, agree(problem)


def _also(names: list[str]) -> str:
    return f" ({', '.join(names)} unreadable too)" if names else ""


def load(path: Path, whole: bool = True, part: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, refusing anything but tensors and plain values, and any
    file whose contents differ from its digest (one written before digests has none to check).

    Whatever torch raises for damaged bytes (its zip reader and unpickler raise many kinds of
    exception) becomes one :class:`CheckpointError` line. A sharded checkpoint (its folder or a
    pointer) is checked file by file (its ``part`` of them, see :func:`sharded.check_files`) and,
    when ``whole``, assembled in today's single-file form;
    otherwise its large states stay ``sharded.IN_SHARDS`` and its folder is under ``sharded.FOLDER``.
    """
    if sharded.is_sharded(path):
        return _load_sharded(path, whole, part)
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
    except Exception as exc:  # RuntimeError, EOFError, KeyError, IndexError, struct.error, ...
        detail = first_line(exc) if isinstance(exc, (RuntimeError, OSError, EOFError, ValueError)) \
            else f"{type(exc).__name__} {first_line(exc)}"  # e.g. the unpickler's "KeyError 101"
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a checkpoint ({detail})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this trainer (no 'model' entry)")
    if not digest.matches(state):
        raise CheckpointError(f"checkpoint {path} is damaged: its contents do not match its digest "
                              "(a flipped bit on disk or in transfer); use an older checkpoint")
    return state


def _load_sharded(path: Path, whole: bool, part: tuple[int, int]) -> dict[str, Any]:
    folder = sharded.resolve(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint not found: {folder}")
    state = load(folder / sharded.PIECES)
    sharded.check_files(folder, state, part)
    if not whole:
        return {**state, sharded.FOLDER: folder}
    tensors = sharded.read_whole(folder, sharded.held(state))
    if "optimizer" in tensors:  # keyed by parameter position, as a single file's
        tensors["optimizer"] = keyed_by_position(tensors["optimizer"])
    return sharded.join(state, tensors)


# ----------------------------------------------------------------------------- history
def rewrite_lines(path: Path, lines: list[str]) -> None:
    """Replace ``path`` with ``lines`` atomically (metrics.jsonl from the checkpoint's history)."""
    try:
        with atomic.replacing(path) as file:
            file.write("".join(line + "\n" for line in lines).encode())
    except OSError as exc:
        raise StorageError(stopped_by_write(str(path), exc, path)) from None


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
