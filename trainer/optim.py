"""Optimizer and learning-rate schedule (linear warmup, then cosine, step or constant), by progress."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from trainer.config import OptimConfig, SchedConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD, Adam, AdamW or Adagrad; norm and bias parameters skip weight decay unless configured.

    Uses the fused implementation on CUDA and CPU (SGD, Adam, AdamW), the foreach one elsewhere.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 and not cfg.decay_norm_and_bias else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]
    fast = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, **fast)
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **fast)
    return torch.optim.Adagrad(groups, lr=cfg.lr, eps=cfg.eps, foreach=True)


class OptimizerState:
    """The optimizer as a checkpoint piece: its buffers (momentum, Adam moments) come from the
    checkpoint, its hyper-parameters (momentum, weight decay, betas...) from the current config,
    so that overrides given at a resume take effect."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        configured = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state)
        for group, own in zip(self.optimizer.param_groups, configured):
            group.update(own)


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
    """Sets the learning rate of each optimizer step from training progress (see :func:`lr_factor`).

    The base rate, schedule and length come from the current config, never from the checkpoint:
    ``optim.lr``, ``sched.*`` and ``train.epochs`` given at a resume apply from the resume point.
    Its state is the progress window of the last step, so the logged rate survives a resume.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, cfg: SchedConfig, epochs: int) -> None:
        self.optimizer, self.base_lr, self.cfg, self.epochs = optimizer, base_lr, cfg, epochs
        self.start, self.end = 0.0, 0.0

    def set_window(self, start: float, end: float) -> None:
        """Set the rate for the optimizer step that covers progress [start, end) (in epochs)."""
        self.start, self.end = start, end
        self._apply()

    def _apply(self) -> None:
        lr = self.base_lr * lr_factor(self.start, self.end, self.cfg, self.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, float]:
        return {"start": self.start, "end": self.end}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.start, self.end = float(state["start"]), float(state["end"])
        self._apply()
