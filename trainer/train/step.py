"""The training step: mixed precision, gradient scaling, accumulation with ``no_sync``, clipping, EMA.

One public call, :meth:`TrainStep.micro_batch`, forwards and backwards one micro-batch and, at the
end of an accumulation window, steps the optimizer in the AMP order: scale -> backward -> unscale
-> clip -> step -> update -> zero_grad -> EMA. The learning rate is not stepped here: the Worker
sets it from training progress before each step (``optim.Schedule``). Nothing in a steady-state step makes the
host wait for the device: the loss stays a device tensor, the scaler's skips are counted on the
device, and the EMA counts its updates in Python.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.models import evaluation_mode
from trainer.parallel.strategy import Parallel
from trainer.tasks.base import Task
from trainer.train.ema import ModelEma
from trainer.train.micro_batch import BackwardOutOfMemory, MicroBatchChoice
from trainer.train.precision import Precision


class TrainStep:
    """Owns what one optimizer step needs beyond the model and optimizer: autocast, the scaler,
    accumulation, clipping, non-finite handling and the EMA.

    ``model`` is what runs the forward pass (wrapped by ``parallel``: DDP and/or compiled);
    ``net`` is the plain module underneath, whose parameters are clipped and averaged (into
    ``ema_module``, when the strategy made the EMA's module). The loss
    is the ``task``'s; the batch arrives on the device, through the device stages.
    """

    def __init__(self, net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, parallel: Parallel,
                 task: Task, precision: Precision, device: torch.device, cfg: TrainConfig,
                 ema_module: nn.Module | None = None, micro_batches: MicroBatchChoice | None = None) -> None:
        self.net, self.model, self.optimizer, self.parallel, self.task = net, model, optimizer, parallel, task
        self.precision, self.device, self.cfg = precision, device, cfg
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.scaled)
        self.ema = (ModelEma(net, cfg.ema_decay, cfg.ema_steps, cfg.ema_warmup, ema_module)
                    if cfg.ema_decay > 0 else None)
        self.skipped_steps = 0  # non-finite gradients skipped (train.on_nonfinite_loss=skip)
        self.scaler_skips = torch.zeros((), dtype=torch.int32, device=device)  # read once per epoch
        self.window_has_data = False  # a micro-batch of this accumulation window was not a stand-in
        self.micro_batches = micro_batches or MicroBatchChoice.fixed()
        self.cut = self.micro_batches.train  # how each micro-batch is cut (train.micro_batch=auto)

    def micro_batch(self, images: torch.Tensor, targets: torch.Tensor, window: int, last: bool,
                    stand_in: bool = False) -> torch.Tensor:
        """Forward and backward one micro-batch of a ``window``-micro-batch accumulation window; on the
        ``last`` one, step the optimizer. Returns the micro-batch's mean loss (a device tensor).

        A ``stand_in`` batch (see :mod:`trainer.train.bad_batches`) runs in eval mode with zero weight.
        Under ``train.micro_batch=auto`` the batch runs in the pieces :attr:`cut` says, each weighted
        by its share; a forward out of memory on any rank doubles them on every rank and the rest of
        the batch runs again (see :mod:`trainer.train.micro_batch`); a backward out of memory raises
        :class:`BackwardOutOfMemory`.
        """
        cut, count = self.cut, targets.shape[0]
        mean, piece, resync = None, 0, False
        while piece < cut.pieces:
            start, end = cut.span(count, piece)
            blank = end == start  # fewer samples than pieces: a zero-weight forward keeps DDP's collectives in step
            chunk = slice(start, end) if not blank else slice(0, 1)
            sync = (last and piece == cut.pieces - 1) or resync
            with self.parallel.no_sync(boundary=sync):
                try:
                    loss = self._forward(images[chunk], targets[chunk], stand_in or blank)
                except torch.OutOfMemoryError:
                    if not cut.auto:
                        raise
                    loss = None
                if cut.auto and cut.agree(loss is None)[0]:
                    # Dropped on every rank: the rest of the batch runs in twice as many pieces. A dropped
                    # forward that was to reduce left DDP expecting a reduction on the ranks where it ran,
                    # not on the others: the next forward reduces on every rank (averaging is linear, so
                    # reducing some of the window's gradients early changes nothing).
                    loss, piece, resync = None, piece * 2, sync
                    continue
                resync = False
                share = (end - start) / count
                try:
                    self.scaler.scale(_weighted(loss, share, window)).backward()
                except torch.OutOfMemoryError:
                    if not cut.auto:
                        raise
                    raise BackwardOutOfMemory() from None
            part = loss.detach() if share == 1 else loss.detach() * share
            mean = part if mean is None else mean + part
            piece += 1
        self.window_has_data |= not stand_in
        if last:
            if self.window_has_data or self.parallel.lockstep:  # all ranks step: none knows the others' data
                self._optimizer_step()
            else:
                self.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
            self.window_has_data = False
        return mean

    def _forward(self, images: torch.Tensor, targets: torch.Tensor, blank: bool) -> torch.Tensor:
        """The loss of one forward; a ``blank`` one runs in eval mode and weighs nothing."""
        with self.precision.autocast(self.device), evaluation_mode(self.net) if blank else nullcontext():
            logits = self.model(images)
        loss = self.task.loss(logits.float(), targets)
        return loss * 0.0 if blank else loss

    def _optimizer_step(self) -> None:
        cfg = self.cfg
        skip_nonfinite = cfg.on_nonfinite_loss == "skip" and not self.scaler.is_enabled()
        if cfg.clip_grad_norm > 0 or skip_nonfinite:
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.net.parameters(), cfg.clip_grad_norm or float("inf"))
            if skip_nonfinite and not torch.isfinite(norm):  # the one per-step sync, opt-in
                self.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
                return
        if self.scaler.is_enabled():
            # The scaler lowers its scale exactly when it skipped the step. ``get_scale()`` would read
            # the device; the private ``_scale`` tensor (set by ``scale()`` above) is compared on it.
            scale_before = self.scaler._scale.clone()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scaler_skips += (self.scaler._scale < scale_before).int()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step()

    def skipped(self) -> int:
        """Optimizer steps skipped so far: non-finite gradients and scaler overflows (reads the device)."""
        return self.skipped_steps + int(self.scaler_skips)

    def state_dict(self) -> dict[str, Any]:
        ema = ({"model": self.parallel.model_state(self.ema.module), "updates": self.ema.updates,
                "steps": self.ema.steps} if self.ema else None)
        return {"scaler": self.scaler.state_dict(), "ema": ema,
                "skipped_steps": self.skipped_steps, "scaler_skips": int(self.scaler_skips),
                "micro_batch": self.micro_batches.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """What the checkpoint has: a run that had no scaler or no EMA leaves this one's fresh (an
        EMA switched on at a resume starts from the resumed weights)."""
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.parallel.load_model_state(self.ema.module, state["ema"]["model"])
            self.ema.updates = int(state["ema"]["updates"])
            self.ema.steps = int(state["ema"].get("steps", self.ema.updates))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.scaler_skips.fill_(int(state.get("scaler_skips", 0)))
        self.micro_batches.load_state_dict(state.get("micro_batch"))


def _weighted(loss: torch.Tensor, share: float, window: int) -> torch.Tensor:
    """A piece's loss in the window's mean: its ``share`` of the micro-batch, one ``window``-th of
    the step (a whole micro-batch divides as before pieces existed)."""
    if share == 1:
        return loss / window if window > 1 else loss
    return loss * (share / window)
