"""Optimizer, its peak learning rate by global batch, and the schedule (linear warmup, then
cosine, step or constant), by progress."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from typing import Callable, Collection

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.config import OPEN_CHOICES, Config, OptimConfig, SchedConfig, user_code
from trainer.errors import ConfigError
from trainer.models.catalog import TIMM_MISSING

BUILTIN_OPTIMIZERS = OPEN_CHOICES["optim.name"]
BUILTIN_SCHEDULES = OPEN_CHOICES["sched.name"]
ADAPTIVE = ("adam", "adamw", "adagrad", "lamb")
"""Optimizers whose rate follows the square root of the batch under ``optim.lr_scaling=auto`` (as timm's)."""
FROM_TIMM = ("lamb", "lars", "lion")
"""Built-in names that torch has no optimizer for: timm.optim's (an optional dependency)."""


def check_available(cfg: OptimConfig) -> None:
    """Before any work: timm's optimizers need timm installed (looked up, not imported)."""
    if cfg.name in FROM_TIMM and importlib.util.find_spec("timm") is None:
        raise ConfigError(f"optim.name={cfg.name}: {TIMM_MISSING}")


def global_batch(cfg: Config, world_size: int) -> int:
    """Samples per optimizer step: per process x processes x accumulation."""
    return cfg.data.batch_size * world_size * cfg.train.grad_accum_steps


class PeakLr:
    """The peak learning rate: ``optim.lr`` is given for a global batch of ``optim.lr_base_batch``
    samples and scaled to ``batch``, the global batch the run started with: linearly (the rule of
    Goyal et al.), or by the square root for adaptive optimizers (``optim.lr_scaling``).

    A resume keeps the batch the run started with (the schedule's checkpoint state), so another
    world size or batch size continues the same rates.
    """

    def __init__(self, cfg: OptimConfig, batch: int) -> None:
        self.cfg, self.batch = cfg, batch

    @property
    def rule(self) -> str:
        """absolute (``optim.lr_base_batch=0``), linear or sqrt."""
        if self.cfg.lr_base_batch == 0:
            return "absolute"
        if self.cfg.lr_scaling == "auto":
            return "sqrt" if self.cfg.name in ADAPTIVE else "linear"
        return self.cfg.lr_scaling

    @property
    def value(self) -> float:
        ratio = self.batch / self.cfg.lr_base_batch if self.cfg.lr_base_batch else 1.0
        return self.cfg.lr * (math.sqrt(ratio) if self.rule == "sqrt" else ratio)

    def describe(self) -> str:
        """E.g. ``peak lr 0.025 (optim.lr 0.1 x 64/256, global batch 64)``, ``... x sqrt(64/256) ...`` for sqrt."""
        if self.rule == "absolute":
            return f"peak lr {self.value:.4g} (optim.lr, absolute: optim.lr_base_batch=0)"
        ratio = f"{self.batch}/{self.cfg.lr_base_batch}"
        scaled = f"sqrt({ratio})" if self.rule == "sqrt" else ratio
        return f"peak lr {self.value:.4g} (optim.lr {self.cfg.lr:g} x {scaled}, global batch {self.batch})"


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device,
                    head: Collection[str] = (), lr: float | None = None) -> torch.optim.Optimizer:
    """SGD, Adam, AdamW, Adagrad, timm's LAMB, LARS and Lion, or the user's (``optim.name=my_pkg.optim:build``,
    called with the parameter groups and the optim config); norm and bias parameters skip weight
    decay unless configured.

    ``lr`` is the peak rate (:class:`PeakLr`; ``optim.lr`` itself when not given). The parameters
    named in ``head`` (the classifier) get ``lr * head_lr_mult``; every group records whether it
    is the head, so that the schedule can hold a frozen backbone still. With ``optim.layer_decay``
    below 1 each ViT layer's parameters get their own groups (:func:`layer_scales`); the first
    group is always one at the full rate (the rate the logs show).
    Uses the fused implementation on CUDA and CPU (SGD, Adam, AdamW), the foreach one elsewhere
    and for sharded parameters (DTensor has no fused SGD).
    """
    lr = cfg.lr if lr is None else lr
    scales = layer_scales(model, cfg.layer_decay) if cfg.layer_decay < 1 else {}
    groups: dict[tuple[bool, float, bool], dict] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_head, decayed = name in head, not (param.ndim <= 1 and not cfg.decay_norm_and_bias)
            scale = scales.get(name, 1.0)
            groups.setdefault((is_head, scale, decayed), {
                "params": [], "weight_decay": cfg.weight_decay if decayed else 0.0, "head": is_head,
                "lr": lr * scale * (cfg.head_lr_mult if is_head else 1.0)})["params"].append(param)
    groups = [groups[k] for k in sorted(groups, key=lambda k: (k[0], -k[1], not k[2]))]  # type: ignore[assignment]
    if cfg.name not in BUILTIN_OPTIMIZERS:  # the user's: build(param_groups, cfg) -> Optimizer
        return user_code.load_callable(cfg.name, "optim.name")(groups, cfg)
    if cfg.name in FROM_TIMM:
        return _from_timm(groups, cfg, lr)
    sharded = any(isinstance(p, DTensor) for group in groups for p in group["params"])
    fast = {"fused": True} if device.type in ("cuda", "cpu") and not sharded else {"foreach": True}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, **fast)
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return cls(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, **fast)
    return torch.optim.Adagrad(groups, lr=lr, eps=cfg.eps, foreach=True)


VIT_BLOCK = re.compile(r"^(?:blocks\.|encoder\.layers\.encoder_layer_)(\d+)\.")
"""A ViT block's parameters: timm's ``blocks.<i>.`` (ViT, DeiT, BEiT, EVA), torchvision's
``encoder.layers.encoder_layer_<i>.``."""


def layer_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """Layer-wise rate decay for a ViT (as BEiT and timm's ``layer_decay``): of ``L`` blocks, block
    ``i`` learns at ``decay ** (L - i)`` of the rate, what comes before the first block (patch and
    position embeddings, class token) at ``decay ** (L + 1)``, the rest (final norm, head) at 1."""
    names = [name for name, _ in model.named_parameters()]
    blocks = {name: int(match.group(1)) for name in names if (match := VIT_BLOCK.match(name))}
    if not blocks:
        raise ConfigError("optim.layer_decay: the model has no ViT blocks (timm's blocks.<i>, torchvision's "
                          "encoder.layers.encoder_layer_<i>); set optim.layer_decay=1")
    depth, first = max(blocks.values()) + 1, names.index(next(iter(blocks)))
    layers = {name: blocks[name] + 1 if name in blocks else (0 if position < first else depth + 1)
              for position, name in enumerate(names)}
    return {name: decay ** (depth + 1 - layer) for name, layer in layers.items()}


def _from_timm(groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """LAMB (timm's defaults otherwise: its own gradient-norm clip at 1), LARS (SGD with a layer-wise
    trust ratio; ``optim.momentum``, ``optim.nesterov``) or Lion (``optim.betas``, e.g. [0.9, 0.99])."""
    try:
        from timm import optim as timm_optim
    except ImportError:
        raise ConfigError(f"optim.name={cfg.name}: {TIMM_MISSING}") from None
    if cfg.name == "lamb":
        return timm_optim.Lamb(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "lars":
        return timm_optim.Lars(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               eps=cfg.eps)
    return timm_optim.Lion(groups, lr=lr, betas=tuple(cfg.betas))


def lr_factor(start: float, end: float, cfg: SchedConfig, epochs: int) -> float:
    """The multiplier of the base learning rate for an optimizer step over progress [start, end).

    Progress is in epochs (fractional), so the schedule does not depend on steps per epoch: a
    resume with another batch size, world size or accumulation continues the same curve.
    Warmup rises linearly from ``warmup_start_factor`` to 1 at ``warmup_epochs``, read at the
    step's end (so the first step moves even from 0); the decay is read at the step's start (so
    the last step still moves).
    """
    warmup = min(cfg.warmup_epochs, epochs)
    if start < warmup:
        return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * min(1.0, end / warmup)
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** math.floor((start - warmup) / cfg.step_epochs)
    progress = min(1.0, (start - warmup) / (epochs - warmup)) if epochs > warmup else 1.0
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def with_warmup_floor(cfg: SchedConfig, train_size: int) -> SchedConfig:
    """``cfg`` with ``warmup_epochs`` raised to ``warmup_samples_min`` samples of a training set of
    ``train_size`` (as progress, so a small set still warms up over enough steps)."""
    floor = cfg.warmup_samples_min / train_size if train_size else 0.0
    return dataclasses.replace(cfg, warmup_epochs=max(cfg.warmup_epochs, floor))


class Schedule:
    """Sets the learning rate of each optimizer step from training progress (see :func:`lr_factor`,
    or the user's ``sched.name=my_pkg.schedules:factor`` with the same arguments).

    Each parameter group keeps the base rate it was built with (the peak rate ``peak``, times
    ``optim.head_lr_mult`` for the head); groups that are not the head stay at zero while progress
    is under ``frozen_epochs`` (a backbone frozen for ``train.freeze_epochs``). Rates, schedule and
    length come from the current config: ``optim.lr``, ``sched.*`` and ``train.epochs`` given at a
    resume apply from the resume point. The checkpoint keeps the progress window of the last step
    (so the logged rate survives a resume) and the global batch the peak rate was scaled to, which
    a resume keeps: at another world size or batch size the rate stays the same function of progress.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: SchedConfig, epochs: int,
                 frozen_epochs: float = 0.0, peak: PeakLr | None = None) -> None:
        self.optimizer, self.cfg, self.epochs, self.frozen_epochs = optimizer, cfg, epochs, frozen_epochs
        self.peak = peak
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
        kept = {"lr_batch": self.peak.batch, "peak_lr": self.peak.value} if self.peak is not None else {}
        return {"start": self.start, "end": self.end, **kept}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.start, self.end = float(state["start"]), float(state["end"])
        batch = state.get("lr_batch")
        if self.peak is not None and batch is not None and batch != self.peak.batch:
            built_with = self.peak.value
            self.peak.batch = int(batch)
            self.base_lrs = [base * (self.peak.value / built_with) for base in self.base_lrs]
        self._apply()
