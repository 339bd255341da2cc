"""Optimizer and learning-rate schedule (linear warmup, then cosine, step or constant)."""

from __future__ import annotations

import math
from typing import Collection

import torch
from torch import nn

from trainer.config import OptimConfig, SchedConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device,
                    head: Collection[str] = ()) -> torch.optim.Optimizer:
    """SGD, Adam, AdamW or Adagrad; norm and bias parameters skip weight decay unless configured.

    The parameters named in ``head`` (the classifier) get ``lr * head_lr_mult``; every group
    records whether it is the head, so that the schedule can hold a frozen backbone still.
    Uses the fused implementation on CUDA and CPU (SGD, Adam, AdamW), the foreach one elsewhere.
    """
    groups: dict[tuple[bool, bool], dict] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_head, decayed = name in head, not (param.ndim <= 1 and not cfg.decay_norm_and_bias)
            groups.setdefault((is_head, decayed), {
                "params": [], "weight_decay": cfg.weight_decay if decayed else 0.0, "head": is_head,
                "lr": cfg.lr * (cfg.head_lr_mult if is_head else 1.0)})["params"].append(param)
    groups = [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]  # type: ignore[assignment]
    fast = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, **fast)
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **fast)
    return torch.optim.Adagrad(groups, lr=cfg.lr, eps=cfg.eps, foreach=True)


def lr_factor(step: int, total_steps: int, warmup_steps: int, cfg: SchedConfig, steps_per_epoch: int) -> float:
    """The multiplier of the base learning rate at optimizer step ``step``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        period = max(1, round(cfg.step_epochs * steps_per_epoch))
        return cfg.gamma ** ((step - warmup_steps) // period)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedConfig, steps_per_epoch: int,
                    epochs: int, frozen_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step; groups that are not the head get a zero rate
    for the first ``frozen_steps`` (a backbone frozen for ``train.freeze_epochs``)."""
    total = steps_per_epoch * epochs
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        return lr_factor(step, total, warmup, cfg, steps_per_epoch)

    def frozen_then_factor(step: int) -> float:
        return 0.0 if step < frozen_steps else factor(step)

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [factor if group.get("head") or not frozen_steps else frozen_then_factor
                    for group in optimizer.param_groups])
