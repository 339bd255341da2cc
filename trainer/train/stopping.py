"""When the ranks stop, save within an epoch, or ask SLURM to requeue: decided together, at
optimizer-step boundaries, from the stop signals each rank received and the checkpoint settings."""

from __future__ import annotations

import time

from trainer.config import CheckpointConfig
from trainer.parallel import distributed, slurm
from trainer.parallel.distributed import DistEnv, LaggedAgreement
from trainer.parallel.signals import StopRequest


class StopPolicy:
    """Every rank asks the same questions at the same points; the answers are agreed (a collective)."""

    def __init__(self, cfg: CheckpointConfig, env: DistEnv, stop: StopRequest, agreement: LaggedAgreement) -> None:
        self.cfg, self.env, self.stop, self.agreement = cfg, env, stop, agreement
        self.last_save = time.monotonic()

    def poll(self, global_step: int) -> tuple[bool, bool]:
        """At an optimizer-step boundary: should all ranks stop, or save a mid-epoch checkpoint?
        (Agreed one step late, see :class:`LaggedAgreement`.)"""
        due = self.cfg.every_steps > 0 and global_step % self.cfg.every_steps == 0
        timed = self.cfg.every_minutes > 0 and time.monotonic() - self.last_save >= self.cfg.every_minutes * 60
        stop, timed = self.agreement.poll([self.stop.requested, timed])
        return stop, due or timed

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def requested_anywhere(self) -> bool:
        """Whether any rank got a stop signal (e.g. during validation, which polls nothing)."""
        return distributed.any_rank(self.env, [self.stop.requested])[0]

    def requeue(self) -> bool:
        """After a stop: whether rank 0 should requeue the SLURM job. Any rank's warning signal
        counts: the stop is agreed, so rank 0 may stop before its own copy arrives."""
        warned = distributed.any_rank(self.env, [self.cfg.warning_signal in self.stop.received])[0]
        return self.env.is_main and self.cfg.requeue and warned and slurm.may_requeue(self.cfg.max_requeues)
