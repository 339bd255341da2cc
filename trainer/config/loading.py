"""The config loader: defaults < YAML files < ``key=value`` overrides, checked against the schema.

Unknown keys, wrong types and invalid values raise :class:`ConfigError` with one line that names
the key and the closest valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.config.schema import (CHOICES, DATA_SOURCES, NON_NEGATIVE, OPEN_CHOICES, POSITIVE, TASK_METRICS, TRACKERS,
                                   Config, TaskConfig)
from trainer.errors import ConfigError, first_line


def schema_keys(schema: type = Config, prefix: str = "") -> dict[str, type]:
    """Every leaf key of the schema as a dotted path, mapped to its Python type."""
    keys: dict[str, type] = {}
    for f in dataclasses.fields(schema):
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys.update(schema_keys(f.default_factory, path + "."))  # type: ignore[arg-type]
        else:
            keys[path] = f.type  # type: ignore[assignment]
    return keys


def load(files: Iterable[str | os.PathLike] = (), overrides: Iterable[str] = (),
         base: dict[str, Any] | None = None,
         implied: Callable[[Config], dict[str, Any]] | None = None) -> Config:
    """Build the config from the defaults (then ``base``, e.g. a checkpoint's saved config), then
    each YAML file in order, then the overrides.

    ``implied(cfg)`` may name values that follow from others (the normalisation pretrained weights
    expect); each applies only where no layer set that key.
    """
    known = schema_keys()
    merged = OmegaConf.structured(Config)
    layers = [("the checkpoint's saved config", OmegaConf.create(base))] if base is not None else []
    layers += [(str(path), _read_yaml(Path(path))) for path in files]
    layers += [(f"override {item!r}", _parse_override(item)) for item in overrides]
    for origin, layer in layers:
        for key in _leaf_keys(layer):
            if key not in known:
                raise ConfigError(f"unknown key {key!r} in {origin}{_suggest(key, known)}")
    try:  # one merge of all layers: each OmegaConf.merge deep-copies the whole config
        merged = OmegaConf.merge(merged, *(layer for _, layer in layers))
    except (OmegaConfBaseException, TypeError):  # TypeError: a mapping given where a list belongs
        for origin, layer in layers:  # again layer by layer, to name the one at fault
            try:
                merged = OmegaConf.merge(merged, layer)
            except TypeError as exc:
                raise ConfigError(f"{origin}: {first_line(exc)}; a key holds a mapping where a list or a value "
                                  "belongs") from None
            except OmegaConfBaseException as exc:
                key = getattr(exc, "full_key", None) or "?"
                raise ConfigError(
                    f"{key}: expected {_type_name(known.get(key))}, got {_value_of(layer, key)!r} "
                    f"(in {origin})") from None
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:  # an interpolation ${...} that names no key
        raise ConfigError(f"{getattr(exc, 'full_key', None) or '?'}: {first_line(exc)}; "
                          "give the value itself, not an interpolation") from None
    _validate_open_choices(cfg)
    if implied is not None:
        given = {key for _, layer in layers for key in _leaf_keys(layer)}
        for key, value in implied(cfg).items():
            if key not in given:
                _set(cfg, key, value)
    validate(cfg)
    return cfg


EXAMPLES = {"data.source": "my_pkg.data:build", "task.name": "my_pkg.tasks:build",
            "optim.name": "my_pkg.optim:build", "sched.name": "my_pkg.schedules:factor"}
"""An import path to show for each key of :data:`OPEN_CHOICES`."""


def _validate_open_choices(cfg: Config) -> None:
    """Each key of :data:`OPEN_CHOICES`: a built-in name (stored as spelled there) or an import
    path, which is checked when it is imported."""
    for key, builtin in OPEN_CHOICES.items():
        value = str(get(cfg, key))
        if ":" in value:
            continue
        canonical = {choice.lower(): choice for choice in builtin}
        if value.lower() not in canonical:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(builtin)} nor an import path "
                              f"like {EXAMPLES[key]}{_suggest(value.lower(), canonical, 'value')}")
        _set(cfg, key, canonical[value.lower()])


def validate(cfg: Config) -> None:
    """Check values against :data:`CHOICES`, :data:`POSITIVE` and :data:`NON_NEGATIVE`, and
    ``ckpt.metric`` against a built-in task's metrics."""
    for key, allowed in CHOICES.items():
        value = str(get(cfg, key)).lower()
        if "on" in allowed:  # YAML reads a bare on/off as a boolean
            value = {"true": "on", "false": "off"}.get(value, value)
        canonical = {choice.lower(): choice for choice in allowed}
        if value not in canonical:
            raise ConfigError(f"{key}: {str(get(cfg, key))!r} is not one of {', '.join(allowed)}"
                              f"{_suggest(value, canonical, 'value')}")
        _set(cfg, key, canonical[value])
    for key in POSITIVE:
        if not get(cfg, key) > 0:
            raise ConfigError(f"{key}: must be > 0, got {get(cfg, key)}")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {get(cfg, key)}")
    cfg.data.num_workers = _num_workers(cfg.data.num_workers)
    if cfg.task.name in TASK_METRICS:  # a user's task names its metrics when it is built
        check_metric(cfg, TASK_METRICS[cfg.task.name])
    if cfg.train.ema_decay >= 1:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), e.g. 0.999 (0: off), got {cfg.train.ema_decay}")
    if cfg.model.drop_path is not None and not 0 <= cfg.model.drop_path < 1:
        raise ConfigError(f"model.drop_path: a rate in [0, 1), e.g. 0.1 (null: the model's default), "
                          f"got {cfg.model.drop_path}")
    if not 0 < cfg.optim.layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay: in (0, 1], e.g. 0.65 for a ViT-B fine-tuning (1: off), "
                          f"got {cfg.optim.layer_decay}")
    if not 0 <= cfg.sched.warmup_start_factor <= 1:
        raise ConfigError(f"sched.warmup_start_factor: a fraction of the peak rate in [0, 1], e.g. 0.01, "
                          f"got {cfg.sched.warmup_start_factor}")
    if not 0 < cfg.data.crop_scale_min <= 1 or not 0 < cfg.data.val_crop_fraction <= 1:
        raise ConfigError("data.crop_scale_min and data.val_crop_fraction must be in (0, 1]")
    if not 0 <= cfg.data.randaugment_magnitude <= 30:
        raise ConfigError(f"data.randaugment_magnitude: must be in [0, 30] (torchvision's bins), "
                          f"got {cfg.data.randaugment_magnitude}")
    if not 1 <= cfg.data.augmix_severity <= 10:
        raise ConfigError(f"data.augmix_severity: must be in [1, 10], got {cfg.data.augmix_severity}")
    if cfg.data.decode == "gpu" and cfg.data.auto_augment == "augmix":
        raise ConfigError("data.decode=gpu: data.auto_augment=augmix draws its mixing weights from the device's "
                          "generator, not the sample's seed; use trivialaugment, randaugment or autoaugment, "
                          "or data.decode=cpu")
    if not 0 <= cfg.data.random_erase <= 1:
        raise ConfigError(f"data.random_erase: a probability in [0, 1] (0: off), got {cfg.data.random_erase}")
    for key in ("data.mixup_prob", "data.mixup_switch_prob"):
        if not 0 <= get(cfg, key) <= 1:
            raise ConfigError(f"{key}: a probability in [0, 1], got {get(cfg, key)}")
    _validate_loss(cfg.task)
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3 or min(cfg.data.std) <= 0:
        raise ConfigError("data.mean and data.std need 3 values each, std > 0, e.g. data.std=[0.25,0.25,0.25]")
    if cfg.data.source in DATA_SOURCES[1:] and not cfg.data.root:
        raise ConfigError(f"data.root: required for data.source={cfg.data.source}, e.g. data.root=/data/{cfg.data.source}")
    if not cfg.log.name or "/" in cfg.log.name:
        raise ConfigError(f"log.name: {cfg.log.name!r} must be a non-empty folder name without '/'")
    if cfg.log.straggler_ratio != 0 and not cfg.log.straggler_ratio > 1:
        raise ConfigError(f"log.straggler_ratio: must be > 1, e.g. 1.3 (0: off), got {cfg.log.straggler_ratio}")
    cfg.log.trackers = _validate_trackers(cfg.log.trackers)
    profile_range(cfg.log.profile_steps)
    _validate_sharding(cfg)


def _num_workers(value: Any) -> int | str:
    """``data.num_workers``: an integer >= 0, or ``auto`` (the count trainer/data/workers.py picks)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"data.num_workers: an integer >= 0 or auto (a count from the cores per process), "
                          f"got {value!r}")
    return value


NOT_YET_SHARDED = {"log.graph": lambda cfg: cfg.log.graph,
                   "log.histogram_every_epochs": lambda cfg: cfg.log.histogram_every_epochs > 0,
                   "train.micro_batch=auto": lambda cfg: cfg.train.micro_batch == "auto"}
"""What a sharded run does not do yet: each is refused at start rather than half-working (the graph
and histograms run the model on rank 0 alone, which a sharded model cannot do without the others;
cutting batches after an out-of-memory is built for DDP only)."""


def _validate_sharding(cfg: Config) -> None:
    if cfg.dist.strategy == "ddp" and cfg.ckpt.format == "dcp":
        raise ConfigError("ckpt.format=dcp: a sharded checkpoint needs dist.strategy=fsdp or hsdp "
                          "(under ddp every rank holds the whole model: use ckpt.format=auto or file)")
    if cfg.ckpt.async_save and (cfg.dist.strategy == "ddp" or cfg.ckpt.format == "file"):
        raise ConfigError("ckpt.async_save: writes sharded checkpoints in the background; it needs "
                          "dist.strategy=fsdp or hsdp and ckpt.format=auto or dcp")
    if cfg.dist.strategy == "ddp":
        return
    for key, given in NOT_YET_SHARDED.items():
        if given(cfg):
            raise ConfigError(f"{key}: not available with dist.strategy={cfg.dist.strategy} yet; "
                              f"turn it off or use dist.strategy=ddp")


def _validate_loss(task: TaskConfig) -> None:
    """``task.loss`` against a built-in task, and ``task.bce_target_threshold`` against the loss."""
    if task.name == "multilabel" and task.loss == "ce":
        raise ConfigError("task.loss=ce: multilabel's labels are independent, it trains with bce "
                          "(task.loss=auto or bce)")
    if not 0 <= task.bce_target_threshold < 1:
        raise ConfigError(f"task.bce_target_threshold: must be in [0, 1) (0: off), got {task.bce_target_threshold}")
    bce = task.loss == "bce" or (task.loss == "auto" and task.name == "multilabel")
    if task.bce_target_threshold > 0 and not bce and task.name in TASK_METRICS:
        raise ConfigError(f"task.bce_target_threshold={task.bce_target_threshold} needs task.loss=bce "
                          f"({task.name} trains with cross-entropy)")


def _validate_trackers(names: list[str]) -> list[str]:
    """Without repeats, each one of :data:`TRACKERS` (lower-cased) or an import path."""
    chosen: list[str] = []
    for name in names:
        key = str(name) if ":" in str(name) else str(name).lower()
        if key not in TRACKERS and ":" not in key:
            raise ConfigError(f"log.trackers: {str(name)!r} is not one of {', '.join(TRACKERS)} nor an import path "
                              f"like my_pkg.sinks:build{_suggest(key, TRACKERS, 'value')}")
        if key not in chosen:
            chosen.append(key)
    return chosen


def profile_range(text: str) -> tuple[int, int] | None:
    """``log.profile_steps`` as (first, last) optimizer step, both included; None when empty."""
    if not text:
        return None
    first, sep, last = str(text).partition("-")
    if not (first.strip().isdigit() and last.strip().isdigit() and sep) or not 1 <= int(first) <= int(last):
        raise ConfigError(f"log.profile_steps: {str(text)!r} must be FIRST-LAST optimizer steps with "
                          "1 <= FIRST <= LAST, e.g. log.profile_steps=10-15 ('' to turn it off)")
    return int(first), int(last)


def epoch_metrics(cfg: Config, task_metrics: Sequence[str]) -> list[str]:
    """The metrics an epoch logs that ``ckpt.metric`` may choose from, given the task's."""
    prefixes = ["val/", "val_ema/"] if cfg.train.ema_decay > 0 else ["val/"]
    return [f"{prefix}{name}" for prefix in prefixes for name in task_metrics] + ["train/loss"]


def check_metric(cfg: Config, task_metrics: Sequence[str]) -> None:
    """``ckpt.metric``: ``auto`` becomes the task's first metric (``val/top1`` for classification);
    any other must be logged."""
    if cfg.ckpt.metric == "auto":
        cfg.ckpt.metric = f"val/{task_metrics[0]}"
    if cfg.ckpt.metric not in (metrics := epoch_metrics(cfg, task_metrics)):
        raise ConfigError(f"ckpt.metric: {cfg.ckpt.metric!r} is not logged{_suggest(cfg.ckpt.metric, metrics, 'metric')}")


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts (safe to store in a checkpoint or JSON)."""
    return dataclasses.asdict(cfg)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts (e.g. :func:`to_dict`'s) as one dict of dotted keys: ``{"optim.lr": 0.1, ...}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text, as printed at start-up and saved in the run directory."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)  # what OmegaConf.to_yaml prints, 5x faster


def get(cfg: Any, key: str) -> Any:
    """The value at a dotted key, e.g. ``get(cfg, "optim.lr")``."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg: Any, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    setattr(cfg, leaf, value)


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        layer = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: report the position, not a traceback
        detail = " ".join(str(exc).split())
        raise ConfigError(f"config file {path} is not valid YAML: {detail}") from None
    if layer is None or isinstance(layer, ListConfig):
        raise ConfigError(f"config file {path} must hold a mapping of keys, e.g. 'optim:\\n  lr: 0.1'")
    return layer


def _parse_override(item: str) -> DictConfig:
    key, sep, _ = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=0.1")
    try:
        return OmegaConf.from_dotlist([item])
    except (OmegaConfBaseException, yaml.YAMLError) as exc:  # the value is parsed as YAML
        raise ConfigError(f"override {item!r} could not be parsed: {exc}".splitlines()[0]) from None


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    """The dotted leaf keys of a layer, its interpolations left unresolved (resolved after the merge)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=False)
    if not isinstance(node, dict):
        return [prefix.rstrip(".")]
    keys: list[str] = []
    for key, value in node.items():
        keys += _leaf_keys(value, f"{prefix}{key}.")
    return keys


def _suggest(word: str, options: Iterable[str], what: str = "key") -> str:
    options = list(options)
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    leaf = word.rsplit(".", 1)[-1]
    close += [o for o in options if o.rsplit(".", 1)[-1] == leaf and o not in close]
    return f"; did you mean {' or '.join(repr(c) for c in close[:3])}?" if close else f"; see configs/default.yaml for every {what}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _value_of(layer: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(layer, key)
    except OmegaConfBaseException:
        return "?"
