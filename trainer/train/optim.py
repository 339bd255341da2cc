"""Optimizer and learning-rate schedule (linear warmup, then cosine, step or constant), by progress."""

from __future__ import annotations

import math
from typing import Callable, Collection

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.config import OPEN_CHOICES, OptimConfig, SchedConfig, user_code

BUILTIN_OPTIMIZERS = OPEN_CHOICES["optim.name"]
BUILTIN_SCHEDULES = OPEN_CHOICES["sched.name"]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device,
                    head: Collection[str] = ()) -> torch.optim.Optimizer:
    """SGD, Adam, AdamW, Adagrad or the user's (``optim.name=my_pkg.optim:build``, called with the
    parameter groups and the optim config); norm and bias parameters skip weight decay unless configured.

    The parameters named in ``head`` (the classifier) get ``lr * head_lr_mult``; every group
    records whether it is the head, so that the schedule can hold a frozen backbone still.
    Uses the fused implementation on CUDA and CPU (SGD, Adam, AdamW), the foreach one elsewhere
    and for sharded parameters (DTensor has no fused SGD).
    """
    groups: dict[tuple[bool, bool], dict] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_head, decayed = name in head, not (param.ndim <= 1 and not cfg.decay_norm_and_bias)
            groups.setdefault((is_head, decayed), {
                "params": [], "weight_decay": cfg.weight_decay if decayed else 0.0, "head": is_head,
                "lr": cfg.lr * (cfg.head_lr_mult if is_head else 1.0)})["params"].append(param)
    groups = [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]  # type: ignore[assignment]
    if cfg.name not in BUILTIN_OPTIMIZERS:  # the user's: build(param_groups, cfg) -> Optimizer
        return user_code.load_callable(cfg.name, "optim.name")(groups, cfg)
    sharded = any(isinstance(p, DTensor) for group in groups for p in group["params"])
    fast = {"fused": True} if device.type in ("cuda", "cpu") and not sharded else {"foreach": True}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, **fast)
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **fast)
    return torch.optim.Adagrad(groups, lr=cfg.lr, eps=cfg.eps, foreach=True)


def lr_factor(start: float, end: float, cfg: SchedConfig, epochs: int) -> float:
    """The multiplier of the base learning rate for an optimizer step over progress [start, end).

    Progress is in epochs (fractional), so the schedule does not depend on steps per epoch: a
    resume with another batch size, world size or accumulation continues the same curve.
    Warmup rises linearly to 1 at ``warmup_epochs`` (by the step's end, so the first step moves);
    the decay is read at the step's start (so the last step still moves).
    """
    warmup = min(cfg.warmup_epochs, epochs)
    if start < warmup:
        return min(1.0, end / warmup)
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** math.floor((start - warmup) / cfg.step_epochs)
    progress = min(1.0, (start - warmup) / (epochs - warmup)) if epochs > warmup else 1.0
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Schedule:
    """Sets the learning rate of each optimizer step from training progress (see :func:`lr_factor`,
    or the user's ``sched.name=my_pkg.schedules:factor`` with the same arguments).

    Each parameter group keeps the base rate it was built with (``optim.lr``, times
    ``optim.head_lr_mult`` for the head); groups that are not the head stay at zero while progress
    is under ``frozen_epochs`` (a backbone frozen for ``train.freeze_epochs``). Rates, schedule and
    length come from the current config, never from the checkpoint: ``optim.lr``, ``sched.*`` and
    ``train.epochs`` given at a resume apply from the resume point. Its state is the progress
    window of the last step, so the logged rate survives a resume.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: SchedConfig, epochs: int,
                 frozen_epochs: float = 0.0) -> None:
        self.optimizer, self.cfg, self.epochs, self.frozen_epochs = optimizer, cfg, epochs, frozen_epochs
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.start, self.end = 0.0, 0.0
        self.factor: Callable[[float, float, SchedConfig, int], float] = (
            lr_factor if cfg.name in BUILTIN_SCHEDULES else user_code.load_callable(cfg.name, "sched.name"))

    def set_window(self, start: float, end: float) -> None:
        """Set the rate for the optimizer step that covers progress [start, end) (in epochs)."""
        self.start, self.end = start, end
        self._apply()

    def _apply(self) -> None:
        factor = float(self.factor(self.start, self.end, self.cfg, self.epochs))
        frozen = self.start < self.frozen_epochs
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = 0.0 if frozen and not group.get("head") else base * factor

    def lr(self) -> float:
        """The first group's rate: the backbone's (zero while frozen), or the only one."""
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, float]:
        return {"start": self.start, "end": self.end}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.start, self.end = float(state["start"]), float(state["end"])
        self._apply()
