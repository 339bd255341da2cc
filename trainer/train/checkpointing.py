"""The Worker's checkpoints: rank 0 writes the pieces' state as ``step_<n>.pt`` and points
``last.pt`` (and ``best.pt``) at it; a resume loads every piece back and says what changed.

Under ``ckpt.format=dcp`` (a sharded run's default) a checkpoint is a folder ``step_<n>/``: every
rank writes its shards of the model, optimizer and EMA with DCP, rank 0 the small pieces beside
them (see :mod:`trainer.checkpoint.sharded`); ``last.ptr`` and ``best.ptr`` name it."""

from __future__ import annotations

import copy
import platform
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torchvision
from torch import nn

from trainer import checkpoint
from trainer.checkpoint import sharded
from trainer.config import Config, to_dict
from trainer.errors import CheckpointError
from trainer.observe.console import log
from trainer.parallel import distributed
from trainer.parallel.distributed import DistEnv
from trainer.train import optim


class RunCheckpoints:
    """Saving and resuming for one run directory; every rank calls both (saving gathers state)."""

    def __init__(self, cfg: Config, env: DistEnv, run_dir: Path, classes: list[str]) -> None:
        self.cfg, self.env, self.classes = cfg, env, classes
        self.folder = checkpoint.checkpoint_dir(run_dir)
        self.sharded = sharded_format(cfg, env)
        suffix = sharded.POINTER if self.sharded else ".pt"
        self.last, self.best = self.folder / f"last{suffix}", self.folder / f"best{suffix}"
        # ckpt.async_save: DCP's background save runs its collectives on a group of its own
        self.async_group = dist.new_group(backend="gloo") if self.sharded and cfg.ckpt.async_save else None
        self.pending: tuple[Any, Path, dict[str, Any], int, bool] | None = None

    def save(self, pieces: Mapping[str, checkpoint.Stateful], meta: dict[str, Any], step: int,
             best: bool = False) -> None:
        """Rank 0 writes ``step_<step>.pt`` atomically, links ``last.pt`` (and ``best.pt``), prunes;
        when it cannot (a full disk), every rank raises its :class:`CheckpointError`."""
        meta = {"classes": self.classes, "config": to_dict(self.cfg), "versions": versions(),
                "world_size": self.env.world_size, **meta}
        state = checkpoint.capture(pieces, meta)
        if self.sharded:
            return self._save_sharded(state, step, best)
        problem = None
        if self.env.is_main:
            try:
                checkpoint.save_step(state, self.folder, step, best, self.cfg.ckpt.keep_last)
            except CheckpointError as exc:  # a full disk: every rank stops with rank 0's line
                problem = str(exc)
        # Also the barrier: no rank goes on (or exits) before rank 0 has written the file.
        self._agree(problem)

    def _save_sharded(self, state: dict[str, Any], step: int, best: bool) -> None:
        """Every rank its shards into rank 0's temporary folder; once all are written (DCP's save is
        a collective that ends with the metadata), rank 0 adds the small pieces and the files'
        digests, renames the folder into place, points ``last.ptr`` at it and prunes. With
        ``ckpt.async_save`` the shards are written in the background (from a copy taken now) and
        the folder is put in place by :meth:`wait`: at the next save, or when the run stops or ends."""
        self.wait()
        tensors = sharded.split(state)
        tmp, problem = None, None
        if self.env.is_main:
            try:
                tmp = sharded.temporary_folder(self.folder, step)
            except OSError as exc:
                problem = f"cannot create a checkpoint folder in {self.folder} ({exc}); free space or fix the folder"
        tmp = self._agree(problem, tmp)
        if self.async_group is not None:
            self.pending = (sharded.write_shards_later(tensors, tmp, self.async_group), tmp, copy.deepcopy(state),
                            step, best)
            return
        sharded.write_shards(tensors, tmp)
        self._publish(tmp, state, step, best)

    def wait(self) -> None:
        """Every rank: finish the save still being written (``ckpt.async_save``), if any, and put it in place."""
        if self.pending is None:
            return
        writing, tmp, state, step, best = self.pending
        self.pending = None
        try:
            writing.result()
            problem = None
        except Exception as exc:  # DCP gathers every rank's failure
            problem = (f"could not write the shards of checkpoint {tmp.parent} ({' '.join(str(exc).split())[:300]}); "
                       "free space or fix the folder, then run the same command again (ckpt.resume=auto)")
        if (problem := self._first_problem(problem)) is not None:
            raise CheckpointError(problem)
        self._publish(tmp, state, step, best)

    def _publish(self, tmp: Path, state: dict[str, Any], step: int, best: bool) -> None:
        problem = None
        if self.env.is_main:
            try:
                shards = sharded.digests(tmp)
                sharded.publish(tmp, self.folder, step, best,
                                lambda path: checkpoint.save_atomic({**state, sharded.SHARDS: shards}, path))
                checkpoint.prune(self.folder, self.cfg.ckpt.keep_last)
            except CheckpointError as exc:
                problem = str(exc)
            except OSError as exc:
                problem = (f"wrote the shards in {tmp} but could not put the checkpoint in place ({exc}); "
                           "free space or fix the folder and run the same command again (ckpt.resume=auto)")
        self._agree(problem)

    def _agree(self, problem: str | None, value: Any = None) -> Any:
        """Rank 0's ``value``, or every rank raises rank 0's ``problem`` (also a barrier)."""
        problem, value = distributed.broadcast_object(self.env, (problem, value))
        if problem is not None:
            raise CheckpointError(problem)
        return value

    def resume(self, path: Path, fall_back: bool, pieces: dict[str, checkpoint.Stateful], net: nn.Module) -> Path:
        """Restore ``pieces`` from ``path`` (or, with ``fall_back`` and an unreadable ``path``, from
        the newest older one that reads), whatever changed since: one line says what changed and
        whether the result stays bitwise exact. Returns the checkpoint used."""
        shared = {"part": (self.env.rank, self.env.world_size), "agree": self._first_problem} if self.sharded else {}
        state, path = checkpoint.load_for_resume(path, fall_back, announce=self.env.is_main, whole=not self.sharded,
                                                 **shared)
        checkpoint.check_classes(state, self.classes, path)
        folder = state.pop(sharded.FOLDER, None)
        weights = sharded.shapes(folder, "model") if folder is not None else state["model"]
        if (mismatch := checkpoint.weight_mismatch(net, weights)) is not None:
            raise CheckpointError(f"{path} does not match the model ({mismatch}); "
                                  "check model.name and the number of classes")
        saved = state.get("config") or {}
        changes, inexact = checkpoint.changes_since(saved, to_dict(self.cfg), state.get("world_size", 0),
                                                    self.env.world_size, defaults=to_dict(Config()))
        saved_optim = saved.get("optim", {})
        if (saved_optim.get("name"), saved_optim.get("decay_norm_and_bias")) != (
                self.cfg.optim.name, self.cfg.optim.decay_norm_and_bias):
            pieces = {name: piece for name, piece in pieces.items() if name != "optimizer"}
            changes.append("optimizer state not restored (another optimizer or parameter grouping)")
        kept = (state.get("schedule") or {}).get("lr_batch")
        now = optim.global_batch(self.cfg, self.env.world_size)
        if kept is not None and kept != now and self.cfg.optim.lr_base_batch:
            changes.append(f"{optim.PeakLr(self.cfg.optim, kept).describe()} kept from the start of the run "
                           f"(global batch {now} now)")
        if folder is not None:
            state = self._read_shards(state, pieces, folder)
        checkpoint.restore(pieces, state, path)
        log.info(checkpoint.describe_changes(changes, inexact))
        return path


    def _first_problem(self, problem: str | None) -> str | None:
        """The first rank's problem with a checkpoint, on every rank (each checked its part of the files)."""
        return next((found for found in distributed.all_gather_objects(self.env, problem) if found), None)

    @staticmethod
    def _read_shards(state: dict[str, Any], pieces: dict[str, checkpoint.Stateful], folder: Path) -> dict[str, Any]:
        """``state`` with the large states this run restores read from ``folder`` into this run's
        own sharded states (the templates: DCP reshards into them, whatever the saved world size)."""
        held, templates = sharded.held(state), {}
        for name in ("model", "optimizer"):
            if name in held and name in pieces:
                templates[name] = pieces[name].state_dict()
        if "ema" in held and "step" in pieces and (ema := pieces["step"].state_dict()["ema"]) is not None:
            templates["ema"] = ema["model"]
        sharded.read_shards(templates, folder)
        return sharded.join(state, templates)


def sharded_format(cfg: Config, env: DistEnv) -> bool:
    """Whether checkpoints are DCP folders: ``ckpt.format`` dcp or auto, under a sharding strategy
    with a process group (one process has no shards: it writes the single file)."""
    return cfg.ckpt.format != "file" and cfg.dist.strategy != "ddp" and env.is_distributed


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__)}
