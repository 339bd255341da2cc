"""Deferred initialisation: a model built without its parameters' memory, sharded, then given its
values shard by shard, so that no process ever holds the whole model (``dist.strategy=fsdp/hsdp``).

The model is constructed with every parameter moved to the meta device as it is registered (the
buffers stay real: BatchNorm's statistics and indices computed in a constructor keep their values).
After sharding, each rank allocates its shards (``to_empty``) and the layers' own initialisation is
replayed module by module, children before their parent (the order in which constructors run): a
module's own parameters, and those of its direct children, are made whole on the CPU, the module's
``reset_parameters`` runs on them from the random state the build started with, and each rank
keeps its slice. Parameters no reset covers (a constructor's own ``nn.Parameter(torch.randn(...))``,
or a module whose reset reaches past its direct children)
get a truncated normal of standard deviation 0.02, drawn whole from a generator of their own
(seeded as the build was: the layers draw what they draw in a one-process build). So the start is
the same on any number of ranks, and equals a one-process build when the model leaves its
initialisation to its layers; constructors that re-initialise their layers themselves (torchvision's
ResNet and ViT, timm's models) start from their layers' defaults instead. ``model.weights`` is then
read tensor by tensor from a memory-mapped file, each rank copying its slice.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from trainer.models.modules import initialise_module

log = logging.getLogger(__name__)

FALLBACK_STD = 0.02
"""The standard deviation (truncated at two) of parameters no layer's reset initialises: the
convention of vision transformers' position embeddings and tokens."""


class DeferredInit:
    """What a model built by :func:`parameters_on_meta` still needs once sharded: its values."""

    def __init__(self, rng_state: torch.Tensor, scheme: str) -> None:
        self.rng_state, self.scheme = rng_state, scheme

    def materialise(self, net: nn.Module, device: torch.device) -> list[str]:
        """Allocate ``net``'s shards on ``device`` and initialise them (see the module's docstring);
        the global random state goes on from where a one-process build would leave it. Returns
        the names of the parameters no layer's reset covers."""
        allocate(net, device)
        torch.random.set_rng_state(self.rng_state)
        uncovered = _replay_resets(net, torch.Generator().set_state(self.rng_state))
        if self.scheme != "default":
            for module in (m for m in net.modules() if any(p is not None for p in m._parameters.values())):
                _on_whole_copy(module, lambda twin: initialise_module(twin, self.scheme), own_values=True)
        log.info("deferred initialisation: the model was built without its parameters' memory; each rank "
                 "initialised its own shards")
        return uncovered


@contextmanager
def parameters_on_meta() -> Iterator[DeferredInit]:
    """Inside, every parameter a module registers goes to the meta device (a full-size tensor lives
    only until its registration); buffers stay as built. Yields the :class:`DeferredInit` whose
    ``scheme`` the caller sets (``model.init``)."""
    deferred = DeferredInit(torch.random.get_rng_state(), "default")
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":  # a tied parameter is registered once more as is
            param = nn.Parameter(param.detach().to("meta"), param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield deferred
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def allocate(net: nn.Module, device: torch.device) -> None:
    """Memory for each rank's shards on ``device``; the buffers keep their values (``to_empty``
    alone would leave them uninitialised too)."""
    buffers = [(buffer, buffer.detach().clone()) for buffer in net.buffers()]
    net.to_empty(device=device)
    with torch.no_grad():
        for (_, value), buffer in zip(buffers, net.buffers()):
            buffer.copy_(value)


def copy_values(source: nn.Module, target: nn.Module) -> None:
    """``target`` (sharded as ``source`` is, not yet allocated) allocated and given ``source``'s values."""
    allocate(target, next(source.parameters()).device)
    with torch.no_grad():
        for mine, theirs in zip([*target.parameters(), *target.buffers()], [*source.parameters(), *source.buffers()]):
            _local(mine).copy_(_local(theirs))


def copy_slices(targets: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
    """Each rank's slice of each whole tensor (typically a view of a memory-mapped file) copied into
    the target of its name (a shard, or a plain tensor whole), one tensor at a time."""
    with torch.no_grad():
        for name, whole in tensors.items():
            target = targets[name]
            _local(target).copy_(whole[_slice(target)])


def _replay_resets(net: nn.Module, fallback: torch.Generator) -> list[str]:
    """Every module's reset on a whole copy of its tensors, children first; the names of the
    parameters no reset covers, which get the fallback, drawn from their own ``fallback`` generator
    (the global one draws exactly what a one-process build's layers draw)."""
    uncovered = []
    owners = {id(module): name for name, module in net.named_modules()}
    for module in _post_order(net):
        if not any(p is not None for p in module._parameters.values()):
            continue
        reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
        if callable(reset):
            method = reset.__name__
            try:
                _on_whole_copy(module, lambda twin: getattr(twin, method)(), own_values=False, children=True)
                continue
            except (AttributeError, IndexError, KeyError):  # a reset reaching past its children: as if none
                pass
        prefix = owners[id(module)] + "." if owners[id(module)] else ""
        uncovered += [prefix + name for name, p in module._parameters.items() if p is not None]
        _on_whole_copy(module, partial(_fallback, generator=fallback), own_values=False)
    return uncovered


def _fallback(module: nn.Module, generator: torch.Generator) -> None:
    for param in module.parameters(recurse=False):
        nn.init.trunc_normal_(param, std=FALLBACK_STD, a=-2 * FALLBACK_STD, b=2 * FALLBACK_STD, generator=generator)


def _on_whole_copy(module: nn.Module, change: Callable[[nn.Module], object], own_values: bool,
                   children: bool = False) -> None:
    """Run ``change`` on a copy of ``module`` whose own parameters are whole CPU tensors (holding
    their current values if ``own_values``, else uninitialised: ``change`` overwrites them) and, with
    ``children``, its direct children's parameters too, with their values; then keep this rank's
    slices of them all."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    twin = _twin(module, pairs, own_values)
    if children:
        twin._modules = {name: None if child is None else _twin(child, pairs, values=True)
                         for name, child in module._modules.items()}
    with torch.no_grad():
        change(twin)
        for target, whole in pairs:
            _local(target).copy_(whole[_slice(target)])


def _twin(module: nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]], values: bool) -> nn.Module:
    """A shallow copy of ``module`` without children, with whole CPU copies of its own parameters
    (with ``values``, gathered: a collective every rank runs in the same order) and of its buffers;
    each (parameter, whole copy) is added to ``pairs``."""
    twin = object.__new__(type(module))  # no constructor: FSDP's module classes construct in __new__
    twin.__dict__ = dict(module.__dict__)
    params: dict[str, nn.Parameter | None] = {}
    for name, param in module._parameters.items():
        if param is None:
            params[name] = None
            continue
        if values:
            whole = (param.full_tensor() if isinstance(param, DTensor) else param).detach().to("cpu", copy=True)
        else:
            whole = torch.empty(param.shape, dtype=param.dtype)
        params[name] = nn.Parameter(whole, param.requires_grad)
        pairs.append((param, params[name]))
    twin._parameters = params  # type: ignore[assignment]
    twin._buffers = {name: None if b is None else b.detach().clone() for name, b in module._buffers.items()}
    twin._modules = {}
    return twin


def _slice(target: torch.Tensor) -> tuple[slice, ...]:
    """This rank's region of a whole tensor shaped as ``target`` (all of it for a plain tensor)."""
    if not isinstance(target, DTensor):
        return tuple(slice(None) for _ in target.shape)
    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    return tuple(slice(start, start + size) for start, size in zip(offset, shape))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _post_order(module: nn.Module) -> list[nn.Module]:
    return [m for child in module.children() for m in _post_order(child)] + [module]
