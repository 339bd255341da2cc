"""Checkpoint files: atomic writes, safe loads, retention, and finding what to resume from.

Layout under ``run_dir/checkpoints``: ``step_<global step>.pt`` files (the newest ``keep_last``
are kept), ``last.pt`` (the newest) and ``best.pt`` (the best by the configured metric). The
last two are hard links to a step file where the filesystem allows, so they cost no space.
A checkpoint holds only tensors and plain Python values: ``torch.load(weights_only=True)`` loads it.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from trainer.errors import CheckpointError

STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that a crash at any moment leaves the old file intact.

    The bytes go to a temporary file in the same folder, are fsynced, then renamed over ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        cause = _os_error(exc)
        if cause is not None:
            raise CheckpointError(f"could not write checkpoint {path} ({cause.strerror or cause}); "
                                  "the previous checkpoint is untouched") from None
        raise
    _fsync_dir(path.parent)


def link_atomic(source: Path, alias: Path) -> None:
    """Make ``alias`` (e.g. ``last.pt``) name the same file as ``source``, atomically."""
    tmp = alias.with_name(f".{alias.name}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # filesystems without hard links: fall back to a copy
        shutil.copyfile(source, tmp)
    os.replace(tmp, alias)
    _fsync_dir(alias.parent)


def step_files(folder: Path) -> list[Path]:
    """The ``step_*.pt`` files in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(folder: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` step files, and temp files a killed writer left."""
    old = step_files(folder)[:-keep_last] if keep_last > 0 else []
    old += [p for p in folder.glob(".*.tmp.*") if not p.name.endswith(f".tmp.{os.getpid()}")]
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
        detail = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "") or _first_line(text)
        raise CheckpointError(f"refusing to load {path}: it holds a pickled Python object, not just tensors "
                              f"({detail}); only load checkpoints you trust, re-saved as plain tensors") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a checkpoint "
                              f"({_first_line(str(exc)) or type(exc).__name__})") from None
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
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(weights)) if weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("shape checkpoint vs model", shapes)) if items]
        raise CheckpointError(f"{origin} does not match the model ({'; '.join(parts)}); "
                              "check model.name and the number of classes")
    model.load_state_dict(weights)


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


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
