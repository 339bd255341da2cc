"""A user's model for the out-of-memory tests: it raises ``torch.OutOfMemoryError`` whenever a pass
takes more than ``LIMIT`` samples, on the rank named by ``OOM_RANK`` (default 1) only: ``build`` in
its forward pass (training and validation), ``build_backward`` in its backward pass."""

import os

import torch
from torch import nn

LIMIT = 16


def _out_of_memory(count: int) -> bool:
    return count > LIMIT and os.environ.get("RANK", "0") == os.environ.get("OOM_RANK", "1")


class ForwardLimit(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _out_of_memory(x.shape[0]):
            raise torch.OutOfMemoryError(f"fake: a forward of {x.shape[0]} samples")
        return x


class BackwardLimitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        if _out_of_memory(grad.shape[0]):
            raise torch.OutOfMemoryError(f"fake: a backward of {grad.shape[0]} samples")
        return grad


class BackwardLimit(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return BackwardLimitFunction.apply(x)


def _body(num_classes: int, limit: nn.Module, batchnorm: bool = False) -> nn.Module:
    """A small CNN; the limit sits after the first convolution, so a failing pass fails midway."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), limit, *([nn.BatchNorm2d(8)] if batchnorm else []),
                         nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


def build(num_classes: int) -> nn.Module:
    return _body(num_classes, ForwardLimit())


def build_backward(num_classes: int) -> nn.Module:
    """With BatchNorm (its warning is checked too)."""
    return _body(num_classes, BackwardLimit(), batchnorm=True)
