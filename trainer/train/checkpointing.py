"""The Worker's checkpoints: rank 0 writes the pieces' state as ``step_<n>.pt`` and points
``last.pt`` (and ``best.pt``) at it; a resume loads every piece back and says what changed."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Mapping

import torch
import torchvision
from torch import nn

from trainer import checkpoint
from trainer.config import Config, to_dict
from trainer.errors import CheckpointError
from trainer.observe.console import log
from trainer.parallel import distributed
from trainer.parallel.distributed import DistEnv


class RunCheckpoints:
    """Saving and resuming for one run directory; every rank calls both (saving gathers state)."""

    def __init__(self, cfg: Config, env: DistEnv, run_dir: Path, classes: list[str]) -> None:
        self.cfg, self.env, self.classes = cfg, env, classes
        self.folder = checkpoint.checkpoint_dir(run_dir)

    def save(self, pieces: Mapping[str, checkpoint.Stateful], meta: dict[str, Any], step: int,
             best: bool = False) -> None:
        """Rank 0 writes ``step_<step>.pt`` atomically, links ``last.pt`` (and ``best.pt``), prunes;
        when it cannot (a full disk), every rank raises its :class:`CheckpointError`."""
        meta = {"classes": self.classes, "config": to_dict(self.cfg), "versions": versions(),
                "world_size": self.env.world_size, **meta}
        state = checkpoint.capture(pieces, meta)
        problem = None
        if self.env.is_main:
            try:
                checkpoint.save_step(state, self.folder, step, best, self.cfg.ckpt.keep_last)
            except CheckpointError as exc:  # a full disk: every rank stops with rank 0's line
                problem = str(exc)
        # Also the barrier: no rank goes on (or exits) before rank 0 has written the file.
        if (problem := distributed.broadcast_object(self.env, problem)) is not None:
            raise CheckpointError(problem)

    def resume(self, path: Path, fall_back: bool, pieces: dict[str, checkpoint.Stateful], net: nn.Module) -> Path:
        """Restore ``pieces`` from ``path`` (or, with ``fall_back`` and an unreadable ``path``, from
        the newest older one that reads), whatever changed since: one line says what changed and
        whether the result stays bitwise exact. Returns the checkpoint used."""
        state, path = checkpoint.load_for_resume(path, fall_back, announce=self.env.is_main)
        checkpoint.check_classes(state, self.classes, path)
        if (mismatch := checkpoint.weight_mismatch(net, state["model"])) is not None:
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
        checkpoint.restore(pieces, state, path)
        log.info(checkpoint.describe_changes(changes, inexact))
        return path


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__)}
