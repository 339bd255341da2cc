"""Build a classification model by name: torchvision's registry plus small built-ins."""

from __future__ import annotations

import difflib
from typing import Any, Callable

import torch
from torch import nn

from trainer.errors import ConfigError


def small_cnn(num_classes: int, image_size: int) -> nn.Module:
    """Four conv-BN-ReLU blocks and a linear head: fast on a CPU, strong enough for the demo."""
    def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                   nn.ReLU(inplace=True)]
        return layers + [nn.MaxPool2d(2)] if pool else layers

    return nn.Sequential(*block(3, 32, True), *block(32, 64, True), *block(64, 128, True),
                         *block(128, 256, False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(256, num_classes))


def linear(num_classes: int, image_size: int) -> nn.Module:
    """One linear layer on the flattened image: no batch norm, no dropout (exact-math tests)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, num_classes))


BUILTIN: dict[str, Callable[[int, int], nn.Module]] = {"smallcnn": small_cnn, "linear": linear}


def available() -> list[str]:
    """Every model name accepted by :func:`build_model` (lower case)."""
    from torchvision import models

    return sorted(set(BUILTIN) | set(models.list_models(module=models)))


def resolve_name(name: str) -> str:
    """The canonical (lower-case) model name, or a ConfigError with the closest valid names."""
    names = available()
    key = name.lower()
    if key in names:
        return key
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else "e.g. smallcnn, resnet18, mobilenet_v3_small"
    raise ConfigError(f"model.name: unknown model '{name}'; {hint}")


def torchvision_options(name: str, image_size: int) -> dict[str, Any]:
    """Builder arguments that make a torchvision model train on ``image_size`` images and return logits.

    GoogLeNet and Inception v3 return (logits, aux logits) tuples in training: their auxiliary
    heads are turned off. Vision transformers learn position embeddings for one input size: the
    configured one. MaxViT is built for the configured size too (its windows need a multiple of 224).
    """
    if name in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "init_weights": True}
    if name.startswith("vit_"):
        return {"image_size": image_size}
    if name.startswith("maxvit_"):
        return {"input_size": (image_size, image_size)}
    return {}


def build_model(name: str, num_classes: int, image_size: int, init: str = "default") -> nn.Module:
    """A freshly initialised classifier with ``num_classes`` outputs (no pretrained weights), checked
    to take ``image_size`` images and return a tensor of logits in training."""
    key = resolve_name(name)
    if key in BUILTIN:
        model = BUILTIN[key](num_classes, image_size)
    else:
        from torchvision import models

        try:
            model = models.get_model(key, weights=None, num_classes=num_classes,
                                     **torchvision_options(key, image_size))
        except (ValueError, AssertionError) as exc:  # e.g. a ViT size that is no multiple of its patch size
            raise ConfigError(f"model.name={key} cannot be built for data.image_size={image_size} "
                              f"({_first_line(exc)}); choose another image size") from None
    check_forward(model, key, image_size)
    initialise(model, init)
    return model


def check_forward(model: nn.Module, name: str, image_size: int) -> None:
    """Run one training-mode forward pass on meta tensors (shapes only, no memory, no compute), so a
    model that cannot take the images, or returns no plain tensor, is refused before any work."""
    meta = {key: torch.empty_like(value, device="meta")
            for key, value in [*model.named_parameters(), *model.named_buffers()]}
    was_training = model.training
    model.train()
    try:
        out = torch.func.functional_call(model, meta, (torch.empty(2, 3, image_size, image_size, device="meta"),))
    except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
        raise ConfigError(f"model.name={name} cannot take data.image_size={image_size} images "
                          f"({_first_line(exc)}); use a larger data.image_size") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        kind = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a {out.ndim}-d tensor"
        raise ConfigError(f"model.name={name} returns {kind} in training, not a (batch, classes) tensor of logits")


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def initialise(model: nn.Module, scheme: str) -> None:
    """Re-initialise conv and linear layers: ``default`` keeps PyTorch's, or kaiming / xavier."""
    if scheme == "default":
        return
    for module in model.modules():
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

