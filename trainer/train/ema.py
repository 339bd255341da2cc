"""An exponential moving average of a model's weights, updated without a host sync."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor


WARMUP_POWER = 2 / 3
"""timm's ModelEmaV3 warmup: the decay after t optimizer steps is at most 1 - (1 + t) ** -WARMUP_POWER."""


class ModelEma:
    """An exponential moving average of a model's weights and floating-point buffers, blended in
    every ``every`` optimizer steps.

    ``decay`` is per optimizer step, so the average's horizon (in steps) does not depend on the
    interval: an update ``every`` steps blends with ``decay ** every``. With ``warmup`` the decay
    is capped by timm's ramp (:data:`WARMUP_POWER`), so the first weights, still random, fade fast.
    ``torch.optim.swa_utils.AveragedModel`` keeps its update count in a device tensor and reads it
    on every update (a host sync per step); here the counts are Python ints and the blend is one
    foreach lerp over all tensors.
    """

    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup: bool = False,
                 module: nn.Module | None = None) -> None:
        """``module``: the average's own module, made as the strategy wants it (a sharded model
        cannot be copied, so its copy is taken before sharding); by default a copy of ``model``."""
        self.module = (copy.deepcopy(model) if module is None else module).eval().requires_grad_(False)
        self.decay, self.every, self.warmup = decay, every, warmup
        self.updates = 0
        self.steps = 0  # optimizer steps seen
        self._source = model

    def step(self) -> None:
        """One optimizer step done: blend the weights in if it is the ``every``-th."""
        self.steps += 1
        if self.steps % self.every == 0:
            self.update()

    def blend_decay(self) -> float:
        """The decay of the next update."""
        per_step = min(self.decay, 1 - (1 + self.steps) ** -WARMUP_POWER) if self.warmup else self.decay
        return per_step ** self.every

    def _tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(ema floats, model floats, ema others, model others), parameters and buffers alike."""
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*self._source.parameters(), *self._source.buffers()]
        floats = [i for i, t in enumerate(mine) if t.is_floating_point()]
        others = [i for i, t in enumerate(mine) if not t.is_floating_point()]
        return ([mine[i] for i in floats], [theirs[i].detach() for i in floats],
                [mine[i] for i in others], [theirs[i] for i in others])

    @torch.no_grad()
    def update(self) -> None:
        """Blend the model's current weights in (the first update copies them)."""
        ema_floats, floats, ema_others, others = self._tensors()
        if self.updates == 0:
            ema_others, others = ema_floats + ema_others, floats + others
        else:
            blend = 1.0 - self.blend_decay()
            for sharded in (False, True):  # one foreach can't mix sharded (DTensor) and plain tensors
                pairs = [(mine, theirs) for mine, theirs in zip(ema_floats, floats)
                         if isinstance(mine, DTensor) == sharded]
                if pairs:
                    torch._foreach_lerp_(*(list(side) for side in zip(*pairs)), blend)
        for mine, theirs in zip(ema_others, others):  # e.g. BatchNorm's num_batches_tracked
            mine.copy_(theirs)
        self.updates += 1
