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
from trainer.train import optim


class RunCheckpoints:
    """Saving and resuming for one run directory; every rank calls both (saving gathers state)."""

    def __init__(self, cfg: Config, env: DistEnv, run_dir: Path, classes: list[str]) -> None:
        self.cfg, self.env, self.classes = cfg, env, classes
        self.folder = checkpoint.checkpoint_dir(run_dir)

    def save(self, pieces: Mapping[str, checkpoint.Stateful], meta: dict[str, Any], step: int,
             best: bool = False) -> None:
        """Rank 0 writes ``step_<step>.pt`` atomically, links ``last.pt`` (and ``best.pt``), prunes."""
        meta = {"classes": self.classes, "config": to_dict(self.cfg), "versions": versions(),
                "world_size": self.env.world_size, **meta}
        state = checkpoint.capture(pieces, meta)
        if self.env.is_main:
            path = self.folder / f"step_{step:09d}.pt"
            checkpoint.save_atomic(state, path)
            checkpoint.link_atomic(path, self.folder / "last.pt")
            if best:
                checkpoint.link_atomic(path, self.folder / "best.pt")
            checkpoint.prune(self.folder, self.cfg.ckpt.keep_last)
        distributed.barrier(self.env)

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
                                                    self.env.world_size)
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
        checkpoint.restore(pieces, state, path)
        log.info(checkpoint.describe_changes(changes, inexact))
        return path


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__)}
