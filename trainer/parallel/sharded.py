"""FSDP2 and HSDP behind the Parallel seam: parameters, gradients and optimizer state sharded.

Each block (see :mod:`trainer.models.blocks`) becomes one ``fully_shard`` unit, gathered just before
its forward and backward and freed after; the root is sharded last and holds what is left (stem,
head). HSDP shards within a group of processes (a node) and replicates across the groups, on a
2-D device mesh. With ``sharded_state`` (``ckpt.format=dcp``) the state methods give and take each
rank's shards (DTensors, the optimizer's keyed by parameter name), which DCP writes and reshards
at load to any world size; otherwise the full, unsharded state in today's single-file format (the
optimizer's keyed by parameter position, as ``Optimizer.state_dict`` writes it), so a run saved
under one strategy or world size resumes under any other. Either form is loaded back.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from trainer.errors import ConfigError
from trainer.parallel.distributed import DistEnv
from trainer.parallel.strategy import Parallel, broadcast_buffers

PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""Mixed precision: the dtype blocks compute in (gradients are reduced and kept in fp32)."""

SAVED = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Gather the full state onto rank 0's CPU memory (the other ranks get an empty state)."""
LOADED = StateDictOptions(full_state_dict=True)
"""Every rank read the whole checkpoint: each keeps its own shard of it."""
SHARDS = StateDictOptions()
"""Each rank's own shards, as DTensors (no gathering)."""


class FullyShardedParallel(Parallel):
    """``dist.strategy=fsdp`` (one shard group of every rank) or ``hsdp`` (``shard_size`` ranks per group)."""

    lockstep = True
    collective_forward = True
    shards_parameters = True

    def __init__(self, env: DistEnv, precision: str, reshard_after_forward: bool, shard_size: int | None,
                 compile_model: bool = False) -> None:
        super().__init__(env, compile_model)
        self.mesh = _mesh(env, shard_size)
        self.policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES.get(precision), reduce_dtype=torch.float32)
        self.reshard_after_forward = reshard_after_forward
        self.root: FSDPModule | None = None

    def wrap(self, net: nn.Module, blocks: Sequence[nn.Module] = ()) -> nn.Module:
        """Sharded per block; with ``model.compile`` each innermost block is compiled in place first
        (its parameter names unchanged), so that each unit's gather and reduction run between
        compiled blocks rather than breaking one whole-model graph."""
        if self.compile_model:
            for block in _innermost(blocks) or [net]:
                block.compile()
        return self._distribute(net, blocks)

    def _distribute(self, net: nn.Module, blocks: Sequence[nn.Module] = ()) -> nn.Module:
        options = {"mesh": self.mesh, "mp_policy": self.policy}
        for block in blocks:
            fully_shard(block, reshard_after_forward=self.reshard_after_forward, **options)
        # The root's parameters are needed again first in the backward: never freed after the forward.
        self.root = fully_shard(net, reshard_after_forward=False, **options)
        return net

    def spread_copy(self, copy: nn.Module, blocks: Sequence[nn.Module]) -> nn.Module:
        """Sharded like the model, so that its tensors pair with the model's shard for shard."""
        for block in blocks:
            fully_shard(block, mesh=self.mesh, mp_policy=self.policy)
        return fully_shard(copy, mesh=self.mesh, mp_policy=self.policy)

    def no_sync(self, boundary: bool) -> AbstractContextManager[Any]:
        return self._gradient_sync(boundary)

    @contextmanager
    def _gradient_sync(self, boundary: bool) -> Iterator[None]:
        """Between boundaries, gradients accumulate unsharded on each rank, without reduce-scatter."""
        if self.root is not None:
            self.root.set_requires_gradient_sync(boundary)
        yield

    def agree_buffers(self, model: nn.Module) -> None:
        broadcast_buffers(model)

    def model_state(self, module: nn.Module) -> dict[str, Any]:
        return get_model_state_dict(module, options=SHARDS if self.sharded_state else SAVED)

    def load_model_state(self, module: nn.Module, state: dict[str, Any]) -> None:
        set_model_state_dict(module, state, options=SHARDS if _in_shards(state) else LOADED)

    def optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Sharded: also the template a sharded load fills (the state is initialised if still empty)."""
        if self.sharded_state:
            return get_optimizer_state_dict(module, optimizer, options=SHARDS)
        state = get_optimizer_state_dict(module, optimizer, options=SAVED)
        return keyed_by_position(state) if state else state

    def load_optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any]) -> None:
        configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        if _keyed_by_names(state):
            set_optimizer_state_dict(module, optimizer, state, options=SHARDS)
        else:
            set_optimizer_state_dict(module, optimizer, _keyed_by_name(state, module, optimizer), options=LOADED)
        for group, own in zip(optimizer.param_groups, configured):
            group.update(own)


def _mesh(env: DistEnv, shard_size: int | None) -> DeviceMesh:
    world, device = env.world_size, env.device.type
    if shard_size is None:
        return init_device_mesh(device, (world,), mesh_dim_names=("shard",))
    if shard_size <= 0 or world % shard_size:
        raise ConfigError(f"dist.hsdp_shard_size: {shard_size} does not divide the {world} processes; "
                          "use a divisor, e.g. the processes per node")
    return init_device_mesh(device, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def _innermost(blocks: Sequence[nn.Module]) -> list[nn.Module]:
    """The blocks that hold no other block (a block compiled inside a compiled one would be traced twice)."""
    ids = {id(block) for block in blocks}
    return [block for block in blocks if not any(id(sub) in ids for sub in block.modules() if sub is not block)]


def _in_shards(state: dict[str, Any]) -> bool:
    """Whether a model state is each rank's shards (DTensors) rather than whole tensors."""
    return any(isinstance(value, DTensor) for value in state.values())


def _keyed_by_names(state: dict[str, Any]) -> bool:
    """Whether an optimizer state is keyed by parameter name (shards) rather than by position (whole)."""
    keys = [*state["state"], *(key for group in state["param_groups"] for key in group["params"])]
    return any(isinstance(key, str) and not key.isdigit() for key in keys)


def keyed_by_position(state: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state with parameter names replaced by their position across the groups,
    as ``Optimizer.state_dict`` numbers them."""
    position = {name: i for i, name in enumerate(n for group in state["param_groups"] for n in group["params"])}
    return {"state": {position[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [position[n] for n in group["params"]]}
                             for group in state["param_groups"]]}


def _keyed_by_name(state: dict[str, Any], module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The inverse of :func:`keyed_by_position` for this optimizer's parameters."""
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {ordered[int(i)]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [ordered[int(i)] for i in group["params"]]}
                             for group in state["param_groups"]]}
