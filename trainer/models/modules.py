"""What the trainer does to any ``nn.Module``: find its head, re-initialise it, switch it to eval
mode for a while, take wrappers off, count its parameters, choose its memory format."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from trainer.errors import ConfigError


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the classifier head's parameters: timm's ``get_classifier()``, else the last
    ``nn.Linear`` (or 1x1 ``nn.Conv2d``) in module order."""
    get_classifier = getattr(model, "get_classifier", None)
    head: nn.Module | None = get_classifier() if callable(get_classifier) else None
    if not isinstance(head, nn.Module):
        candidates = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        head = next((m for m in reversed(candidates) if isinstance(m, nn.Linear)), candidates[-1] if candidates else None)
    if head is None:
        return set()
    ids = {id(p) for p in head.parameters()}
    return {name for name, param in model.named_parameters() if id(param) in ids}


def initialise(model: nn.Module, scheme: str) -> None:
    """Re-initialise conv and linear layers: ``default`` keeps PyTorch's, or kaiming / xavier."""
    if scheme == "default":
        return
    for module in model.modules():
        initialise_module(module, scheme)


def initialise_module(module: nn.Module, scheme: str) -> None:
    """:func:`initialise` for one module's own weight and bias (a conv, linear or norm layer)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        if scheme == "kaiming":
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif scheme == "xavier":
            nn.init.xavier_uniform_(module.weight)
        else:
            raise ConfigError(f"model.init: unknown scheme '{scheme}'; use default, kaiming or xavier")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block; each submodule's own mode back after it."""
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, training in modes:
            sub.training = training


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout of the model's weights and of its input batches."""
    return torch.channels_last if channels_last else torch.contiguous_format


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
