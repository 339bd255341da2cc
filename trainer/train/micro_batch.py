"""``train.micro_batch=auto``: an out-of-memory in the forward pass is survived by cutting each
loaded batch into more pieces, the same on every rank, without changing what is learnt.

The loader keeps serving the configured batches (so the sampler, exactly-once and resume are
untouched); each batch is cut into ``pieces`` contiguous slices, and each slice's loss is weighted
by its share of the batch, so an optimizer step sums the same per-sample gradients as before: the
global batch and the learning-rate curve stay as configured. Every forward is followed by one
agreement on the gloo control group (:func:`trainer.parallel.distributed.agree_on_failure`): when
any rank ran out of memory, every rank drops that forward, doubles ``pieces`` and redoes the rest
of the batch. A forward that ran out of memory left no gradient behind; the slices before it keep
theirs, which are exactly their share.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.checkpoint.atomic import replacing
from trainer.errors import OutOfMemory
from trainer.observe.console import log
from trainer.parallel.distributed import DistEnv, Topology, agree_on_failure, all_gather_objects

NOTE = "micro_batch.json"
"""In the run directory: the training micro-batch the next start must not exceed, written by a rank
whose backward pass ran out of memory (no checkpoint holds that; the run ends right away)."""


class MicroBatches:
    """How each loaded batch of ``batch_size`` per process is cut for the forward pass (``role``:
    training or validation). ``pieces`` is a power of two, equal on every rank."""

    def __init__(self, env: DistEnv, auto: bool, batch_size: int, role: str, accumulation: int = 1) -> None:
        self.env, self.auto, self.batch_size, self.role, self.accumulation = env, auto, batch_size, role, accumulation
        self.pieces = 1

    @property
    def size(self) -> int:
        """The most samples one forward takes."""
        return math.ceil(self.batch_size / self.pieces)

    def describe(self) -> str:
        """``16 x 4`` (micro-batch x micro-batches per optimizer step) in training, ``16`` in validation."""
        return f"{self.size} x {self.accumulation * self.pieces}" if self.role == "training" else str(self.size)

    def span(self, count: int, piece: int) -> tuple[int, int]:
        """[start, end) of ``piece`` in a batch of ``count`` samples. Piece j of p pieces is exactly
        pieces 2j and 2j+1 of 2p, so a doubling continues where it stopped; the last piece is never
        empty (a batch smaller than ``pieces`` has its empty ones first)."""
        return piece * count // self.pieces, (piece + 1) * count // self.pieces

    def agree(self, failed: bool, more: bool = False) -> tuple[bool, bool]:
        """After each forward, on every rank: (whether any rank ran out of memory, whether any rank
        has more to do). On an out-of-memory, ``pieces`` doubles everywhere."""
        rank, more = agree_on_failure(self.env, failed, more)
        if rank is not None:
            self._halve(rank)
        return rank is not None, more

    def _halve(self, rank: int) -> None:
        before = self.size
        if self.pieces >= self.batch_size:
            raise OutOfMemory(f"{self.env.device} ran out of memory in {self.role} on rank {rank} even at one sample "
                              "per forward (train.micro_batch=auto); use a smaller model, data.image_size or "
                              "train.precision=bf16")
        self.pieces *= 2
        log.info("out of memory in the %s forward pass on rank %d at micro-batch %d: every rank now runs %s "
                 "(train.micro_batch=auto; the same samples%s)", self.role, rank, before, self.describe(),
                 " and global batch" if self.role == "training" else "")

    def fit(self, largest: int) -> None:
        """At least as many pieces as make each forward at most ``largest`` samples."""
        while self.size > largest and self.pieces < self.batch_size:
            self.pieces *= 2

    def state_dict(self) -> int:
        return self.size

    def load_state_dict(self, largest: int | None) -> None:
        if self.auto and largest is not None:
            self.fit(int(largest))


class MicroBatchChoice:
    """The training and validation cuts, kept in the checkpoint (inside the step's state) as the
    largest micro-batch that fit, so that a resume, at any ``data.batch_size``, starts below it."""

    def __init__(self, env: DistEnv, auto: bool, batch_size: int, val_batch_size: int, accumulation: int,
                 run_dir: Path | None = None) -> None:
        self.auto, self.run_dir = auto, run_dir
        self.train = MicroBatches(env, auto, batch_size, "training", accumulation)
        self.val = MicroBatches(env, auto, val_batch_size, "validation")

    def state_dict(self) -> dict[str, int] | None:
        return {"train": self.train.state_dict(), "val": self.val.state_dict()} if self.auto else None

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        if state:
            self.train.load_state_dict(state.get("train"))
            self.val.load_state_dict(state.get("val"))
            self.announce("the checkpoint")

    @classmethod
    def fixed(cls) -> MicroBatchChoice:
        """Each batch whole (``train.micro_batch=fixed``), in one process or many: no agreement."""
        return cls(DistEnv(Topology(), torch.device("cpu"), None), False, 1, 1, 1)

    def read_note(self) -> None:
        """Start below a training micro-batch whose backward pass ran out of memory on any rank."""
        if not self.auto or self.run_dir is None:
            return
        note = self.run_dir / NOTE
        largest = json.loads(note.read_text())["train"] if note.is_file() else None
        smallest = min((size for size in all_gather_objects(self.train.env, largest) if size), default=None)
        self.train.load_state_dict(smallest)
        if smallest is not None:
            self.announce(f"{note} (a backward pass ran out of memory)")

    def write_note(self) -> int:
        """This rank's backward pass ran out of memory: the next start uses half the micro-batch."""
        half = max(1, self.train.size // 2)
        assert self.run_dir is not None
        with replacing(self.run_dir / NOTE) as fh:
            fh.write(json.dumps({"train": half}).encode())
        return half

    def announce(self, source: str) -> None:
        if self.train.pieces > 1 or self.val.pieces > 1:
            log.info("train.micro_batch=auto: micro-batch %s in training, %s in validation, from %s",
                     self.train.describe(), self.val.describe(), source)

    def record(self) -> dict[str, Any]:
        """What the epoch's metrics record (``train/micro_batch`` etc.) under auto."""
        if not self.auto:
            return {}
        return {"micro_batch": self.train.size, "micro_batches_per_step": self.train.accumulation * self.train.pieces,
                "val_micro_batch": self.val.size}


def has_batchnorm(net: nn.Module) -> bool:
    """Whether a smaller micro-batch changes ``net``'s training statistics (BatchNorm's batch statistics)."""
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in net.modules())


class BackwardOutOfMemory(RuntimeError):
    """A backward pass ran out of memory under ``train.micro_batch=auto``: gradient buckets may be in
    flight, so the run ends; the next start uses half the micro-batch (:meth:`MicroBatchChoice.write_note`)."""
