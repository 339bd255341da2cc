"""Build a classification model by name: built-ins, torchvision's registry, timm (``timm:NAME``)
or the user's own builder (``package.module:function``); then pretrained weights and freezing."""

from __future__ import annotations

import difflib
import inspect
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import Config, ModelConfig, user_code
from trainer.errors import ConfigError, first_line
from trainer.models.deferred import FALLBACK_STD, parameters_on_meta
from trainer.models.modules import head_parameter_names, initialise
from trainer.models.weights import (checkpoint_data_settings, is_file_spec, load_weights, read_weight_file,
                                    torchvision_file)

log = logging.getLogger(__name__)


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
TIMM_PREFIX = "timm:"
TIMM_MISSING = "timm is not installed; pip install 'torch-launchpad[timm]'"


def available() -> list[str]:
    """Every built-in and torchvision model name accepted by :func:`build_model` (lower case)."""
    from torchvision import models

    return sorted(set(BUILTIN) | set(models.list_models(module=models)))


def resolve_name(name: str) -> str:
    """The canonical model name, or a ConfigError with the closest valid names.

    Built-in and torchvision names are lower-cased; ``timm:NAME`` must be a timm model; an import
    path is imported and must name a callable (its return type is checked when it is called).
    """
    if name.lower().startswith(TIMM_PREFIX):
        return TIMM_PREFIX + _timm_arch(name[len(TIMM_PREFIX):])
    if user_code.is_import_path(name):
        user_code.load_callable(name, "model.name")
        return name
    names = available()
    key = name.lower()
    if key in names:
        return key
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = (f"did you mean {' or '.join(close)}?" if close else
            "e.g. smallcnn, resnet18, timm:convnext_tiny or your own my_pkg.nets:build")
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


def build_model(name: str, num_classes: int, image_size: int, init: str = "default",
                drop_path: float | None = None) -> nn.Module:
    """A freshly initialised classifier with ``num_classes`` outputs (no pretrained weights); a
    torchvision model is checked to take ``image_size`` images and return a tensor of logits.
    ``drop_path`` is the stochastic depth rate of a model that has one (None: the model's own default)."""
    key = resolve_name(name)
    model = _construct(key, num_classes, image_size, pretrained_tag=None, drop_path=drop_path)
    if not (key in BUILTIN or key.startswith(TIMM_PREFIX) or user_code.is_import_path(key)):
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
                          f"({first_line(exc)}); use a larger data.image_size") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        kind = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a {out.ndim}-d tensor"
        raise ConfigError(f"model.name={name} returns {kind} in training, not a (batch, classes) tensor of logits")


def build_for_training(config: Config, num_classes: int) -> nn.Module:
    """:func:`build_model`, then ``model.weights`` (the classifier head is replaced where the class
    count differs) and ``model.freeze``.

    A backbone frozen for the whole run stops computing gradients; one frozen for
    ``train.freeze_epochs`` keeps them (DDP fixes its parameter set once) and gets a zero learning
    rate from the schedule until then.
    """
    cfg, image_size = config.model, config.data.image_size
    key, weights = resolve_name(cfg.name), cfg.weights
    if key.startswith(TIMM_PREFIX) and not is_file_spec(weights) and weights.lower() != "none":
        model = _construct(key, num_classes, image_size, pretrained_tag=weights,  # timm replaces its head
                           drop_path=cfg.drop_path)
        log.info("model.weights=%s: timm pretrained weights for %s", weights, key)
    else:
        model = build_model(key, num_classes, image_size, cfg.init, cfg.drop_path)
        if weights.lower() != "none":
            log.info("%s", load_weights(model, _weight_tensors(key, weights), weights))
    _freeze(model, config)
    return model


def builds_deferred(config: Config) -> bool:
    """Whether :func:`build_deferred` can build the configured model: all but timm's pretrained
    weights, which timm loads into the whole model as it builds it."""
    key, weights = resolve_name(config.model.name), config.model.weights
    return not (key.startswith(TIMM_PREFIX) and not is_file_spec(weights) and weights.lower() != "none")


def build_deferred(config: Config,
                   num_classes: int) -> tuple[nn.Module, Callable[[nn.Module, torch.device], None] | None]:
    """:func:`build_for_training` without the parameters' memory (see :mod:`trainer.models.deferred`),
    and what gives the model its values once sharded: the initialisation, then ``model.weights``,
    each rank its slices of a memory-mapped file. A constructor that reads its parameters' values
    (which the meta device has not) gets the model built whole instead, and None."""
    cfg = config.model
    key, weights = resolve_name(cfg.name), cfg.weights
    try:
        with parameters_on_meta() as deferred:
            model = build_model(key, num_classes, config.data.image_size, "default", cfg.drop_path)
    except (RuntimeError, NotImplementedError) as exc:
        log.warning("model.name=%s cannot be built without its parameters' memory (%s): every process builds it "
                    "whole before sharding it", key, first_line(exc))
        return build_for_training(config, num_classes), None
    deferred.scheme = cfg.init
    _freeze(model, config)

    def materialise(sharded: nn.Module, device: torch.device) -> None:
        uncovered = deferred.materialise(sharded, device)
        if weights.lower() != "none":
            log.info("%s", load_weights(sharded, _weight_tensors(key, weights, mapped=True), weights, into_shards=True))
            return
        if not (key in BUILTIN or user_code.is_import_path(key)):  # torchvision's and timm's constructors
            _warn_on_rank_0("model.name=%s: its constructor initialises its layers itself, which a build without the "
                        "parameters' memory does not replay: they start from PyTorch's layer defaults; for the "
                        "constructor's own initialisation save one build's state dict and give it as model.weights",
                        key)
        if uncovered:
            _warn_on_rank_0("deferred initialisation: %d parameter(s) no layer's reset covers (%s%s) start from a "
                        "normal of std %g; for %s's own initialisation save one build's state dict and give it as "
                        "model.weights", len(uncovered), ", ".join(uncovered[:4]), " ..." if len(uncovered) > 4 else "",
                        FALLBACK_STD, key)

    return model, materialise


def _warn_on_rank_0(message: str, *args: object) -> None:
    """A warning every rank would give alike, given once."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.warning(message, *args)


def _freeze(model: nn.Module, config: Config) -> None:
    if config.model.freeze == "backbone" and config.train.freeze_epochs == 0:
        head = head_parameter_names(model)
        for param_name, param in model.named_parameters():
            param.requires_grad_(param_name in head)


def _construct(key: str, num_classes: int, image_size: int, pretrained_tag: str | None,
               drop_path: float | None = None) -> nn.Module:
    if drop_path is not None and (key in BUILTIN or user_code.is_import_path(key)):
        raise ConfigError(f"model.drop_path: applies to torchvision and timm models, not {key}; "
                          "leave it unset (null)")
    if key in BUILTIN:
        return BUILTIN[key](num_classes, image_size)
    if key.startswith(TIMM_PREFIX):
        import timm

        arch = key[len(TIMM_PREFIX):]
        depth = {} if drop_path is None else {"drop_path_rate": drop_path}
        if pretrained_tag is None:
            return _with_drop_path(key, drop_path, lambda: timm.create_model(arch, pretrained=False,
                                                                             num_classes=num_classes, **depth))
        full = arch if pretrained_tag.upper() == "DEFAULT" or "." in arch else f"{arch}.{pretrained_tag}"
        try:
            return _with_drop_path(key, drop_path, lambda: timm.create_model(full, pretrained=True,
                                                                             num_classes=num_classes, **depth))
        except (OSError, RuntimeError, ValueError) as exc:  # no network, unknown tag, no cached file
            raise ConfigError(f"model.weights: cannot get timm weights '{full}' ({first_line(exc)}); "
                              f"tags: {', '.join(_timm_tags(arch)) or 'none'}; offline, copy the Hugging "
                              "Face cache (HF_HOME) from a machine with network") from None
    if user_code.is_import_path(key):
        return _call_user_builder(key, num_classes, image_size)
    from torchvision import models

    depth = {} if drop_path is None else {"stochastic_depth_prob": drop_path}
    try:
        return _with_drop_path(key, drop_path, lambda: models.get_model(
            key, weights=None, num_classes=num_classes, **torchvision_options(key, image_size), **depth))
    except (ValueError, AssertionError) as exc:  # e.g. a ViT size that is no multiple of its patch size
        raise ConfigError(f"model.name={key} cannot be built for data.image_size={image_size} "
                          f"({first_line(exc)}); choose another image size") from None


def _with_drop_path(key: str, drop_path: float | None, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()``; a model whose constructor takes no stochastic depth rate is named in the error."""
    try:
        return build()
    except TypeError as exc:
        if drop_path is None or "unexpected keyword" not in str(exc):
            raise
        raise ConfigError(f"model.drop_path: {key} has no stochastic depth ({first_line(exc)}); "
                          "leave it unset (null)") from None


def _call_user_builder(spec: str, num_classes: int, image_size: int) -> nn.Module:
    builder = user_code.load_callable(spec, "model.name")
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # some C-implemented callables have no signature
        params = {}
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if "image_size" in params:
        kwargs["image_size"] = image_size
    model = builder(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name: {spec}(num_classes=...) returned {type(model).__name__}, not a "
                          "torch.nn.Module; return the network itself")
    return model


def _timm_arch(arch: str) -> str:
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model.name=timm:{arch}: {TIMM_MISSING}") from None
    if timm.is_model(arch):
        return arch
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join('timm:' + c for c in close)}?" if close else "see timm.list_models()"
    raise ConfigError(f"model.name: unknown timm model '{arch}'; {hint}")


def _timm_tags(arch: str) -> list[str]:
    import timm

    return [name.split(".", 1)[1] for name in timm.list_pretrained(f"{arch}.*")][:6]


def _weight_tensors(key: str, weights: str, mapped: bool = False) -> dict[str, torch.Tensor]:
    """The tensors ``model.weights`` names: a local file or a torchvision weights name (``mapped``:
    views of the memory-mapped file)."""
    if is_file_spec(weights):
        return read_weight_file(Path(weights).expanduser(), mapped)
    enum = _torchvision_weights(key, weights)
    return read_weight_file(torchvision_file(enum), mapped)


def _torchvision_weights(key: str, weights: str) -> Any:
    """The torchvision weights enum member ``weights`` names for model ``key``."""
    from torchvision import models

    if key in BUILTIN or user_code.is_import_path(key):
        raise ConfigError(f"model.weights: '{weights}' names torchvision weights, but model '{key}' has none; "
                          "give a weights file (a state dict or one of our checkpoints), or none")
    enum = models.get_model_weights(key)
    names = ["DEFAULT", *(member.name for member in enum)]
    match = next((n for n in names if n.lower() == weights.lower()), None)
    if match is None:
        raise ConfigError(f"model.weights: '{weights}' is not a weights name of {key} nor a file; "
                          f"use one of {', '.join(names)}, a file path, or none")
    return enum[match] if match != "DEFAULT" else enum.DEFAULT


def sketch(cfg: ModelConfig, image_size: int) -> nn.Module | None:
    """The configured architecture built on the meta device (no memory, no weights read), so that
    options which depend on it are checked before any work; a ``model.drop_path`` the model does not
    take is refused here. None for the user's builders (their code may not expect meta tensors) and
    for models that cannot be built on meta: their real build reports any problem."""
    key = resolve_name(cfg.name)
    if user_code.is_import_path(key):
        if cfg.drop_path is not None:  # refused by its name, before the user's code is called
            _construct(key, 2, image_size, pretrained_tag=None, drop_path=cfg.drop_path)
        return None
    try:
        with torch.device("meta"):
            return _construct(key, 2, image_size, pretrained_tag=None, drop_path=cfg.drop_path)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - e.g. a constructor reading a value off a tensor (.tolist() on meta)
        return None


def check_weights(cfg: ModelConfig) -> None:
    """Before any work: the weights file ``model.weights`` names exists (torchvision's is
    downloaded into ``$TORCH_HOME`` now if it can be), else a ConfigError."""
    key, weights = resolve_name(cfg.name), cfg.weights
    if weights.lower() == "none" or key.startswith(TIMM_PREFIX) and not is_file_spec(weights):
        return
    if is_file_spec(weights):
        if not Path(weights).expanduser().is_file():
            raise ConfigError(f"model.weights: file '{weights}' not found; give a state dict or checkpoint path, "
                              "a torchvision weights name (DEFAULT...), or none")
        return
    torchvision_file(_torchvision_weights(key, weights))


def implied_settings(cfg: Config) -> dict[str, Any]:
    """The data settings the configured weights expect (normalisation, size, crop), which apply
    unless the config sets them itself. Reads no network."""
    weights, name = cfg.model.weights, cfg.model.name
    if weights.lower() == "none":
        return {}
    if is_file_spec(weights):
        return checkpoint_data_settings(Path(weights).expanduser())
    key = resolve_name(name)
    if key.startswith(TIMM_PREFIX):
        from timm.models import get_pretrained_cfg

        arch = key[len(TIMM_PREFIX):]
        tag = arch if weights.upper() == "DEFAULT" or "." in arch else f"{arch}.{weights}"
        pretrained = get_pretrained_cfg(tag)
        if pretrained is None:
            return {}
        size = pretrained.input_size[-1]
        return {"data.mean": list(pretrained.mean), "data.std": list(pretrained.std), "data.image_size": size,
                "data.val_crop_fraction": float(pretrained.crop_pct)}
    transform = _torchvision_weights(key, weights).transforms()
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    return {"data.mean": list(transform.mean), "data.std": list(transform.std), "data.image_size": crop,
            "data.val_crop_fraction": crop / resize}
