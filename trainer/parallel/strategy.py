"""The Parallel seam: how the model is spread over the job's processes.

The Worker and the training step ask only this object to wrap the model for training, to hold
the gradient reduction back between micro-batches, to agree on buffers before an evaluation,
and to turn model, optimizer and EMA state into checkpoint state and back. :class:`Parallel`
is one process on one device; :class:`DataParallel` is DDP; ``sharded.FullyShardedParallel`` is
FSDP2 and HSDP.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.parallel.distributed import DistEnv


class StatePiece:
    """A checkpoint piece read and written by two functions."""

    def __init__(self, read: Callable[[], dict[str, Any]], write: Callable[[dict[str, Any]], None]) -> None:
        self.state_dict, self.load_state_dict = read, write


class Parallel:
    """One process, no process group: the model is trained as it is."""

    lockstep = False
    """Whether every rank must run every optimizer step (DDP: each waits for the others' gradients)."""
    collective_forward = False
    """Whether a forward pass is a collective (sharded: it gathers parameters), so that every rank
    must run as many, evaluation included."""
    sharded_state = False
    """Whether the state methods give each rank's shards (``ckpt.format=dcp``) instead of the whole
    state; only a sharding strategy has shards to give."""
    shards_parameters = False
    """Whether :meth:`wrap` shards the parameters, so that the model can be built without their
    memory and given its values shard by shard once wrapped (see :mod:`trainer.models.deferred`)."""
    waits_outside_compute = False
    """Whether a rank waits for its peers only before its forward pass (DDP's buffer broadcast) and
    after its last gradient (the all-reduce it overlapped), so that its own compute can be timed
    in between (trainer/observe/stragglers.py). Sharded strategies gather and reduce inside both."""

    def __init__(self, env: DistEnv, compile_model: bool = False) -> None:
        self.env, self.compile_model = env, compile_model

    def wrap(self, net: nn.Module, blocks: Sequence[nn.Module] = ()) -> nn.Module:
        """``net`` as the training step runs it: distributed first, then torch.compile, so that
        Dynamo sees DDP and splits the graph at its gradient buckets (all-reduce overlaps the backward).
        ``blocks`` (innermost first) are the units a sharded strategy gathers one at a time."""
        model = self._distribute(net, blocks)
        return torch.compile(model) if self.compile_model else model

    def _distribute(self, net: nn.Module, blocks: Sequence[nn.Module]) -> nn.Module:
        return net

    def no_sync(self, boundary: bool) -> AbstractContextManager[Any]:
        """Around a micro-batch's backward: reduce gradients only at the accumulation ``boundary``."""
        return nullcontext()

    def spread_copy(self, copy: nn.Module, blocks: Sequence[nn.Module]) -> nn.Module:
        """``copy`` (of the model, taken before :meth:`wrap`, with its own ``blocks``) spread as the
        model is, for an evaluation-only twin such as the EMA; here, as it is."""
        return copy

    def agree_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics, EMA-averaged buffers)."""

    def model_state(self, module: nn.Module) -> dict[str, Any]:
        """The plain module's state for a checkpoint (unwrapped: no ``module.`` prefixes)."""
        return module.state_dict()

    def load_model_state(self, module: nn.Module, state: dict[str, Any]) -> None:
        module.load_state_dict(state)

    def optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any]) -> None:
        """The buffers (momentum, Adam moments) come from the checkpoint, the hyper-parameters
        (momentum, weight decay, betas...) from the current config, so that overrides given at a
        resume take effect."""
        configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(state)
        for group, own in zip(optimizer.param_groups, configured):
            group.update(own)

    def checkpoint_pieces(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, StatePiece]:
        """The model's and the optimizer's state as checkpoint pieces (``model``, ``optimizer``)."""
        return {"model": StatePiece(lambda: self.model_state(net), lambda state: self.load_model_state(net, state)),
                "optimizer": StatePiece(lambda: self.optimizer_state(net, optimizer),
                                        lambda state: self.load_optimizer_state(net, optimizer, state))}


class DataParallel(Parallel):
    """DistributedDataParallel: every rank holds the whole model and averages gradients."""

    lockstep = True
    waits_outside_compute = True

    def __init__(self, env: DistEnv, compile_model: bool = False, find_unused_parameters: bool = False) -> None:
        super().__init__(env, compile_model)
        self.find_unused_parameters = find_unused_parameters
        self.ddp: DistributedDataParallel | None = None

    def _distribute(self, net: nn.Module, blocks: Sequence[nn.Module]) -> nn.Module:
        device = self.env.device
        self.ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                           find_unused_parameters=self.find_unused_parameters)
        return self.ddp

    def no_sync(self, boundary: bool) -> AbstractContextManager[Any]:
        return nullcontext() if boundary or self.ddp is None else self.ddp.no_sync()

    def agree_buffers(self, model: nn.Module) -> None:
        broadcast_buffers(model)


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers on every rank."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
