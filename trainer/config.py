"""The configuration schema and its loader: defaults < YAML files < ``key=value`` overrides.

The dataclasses below are the single source of truth for every key; ``configs/default.yaml``
mirrors them with comments (a test keeps the two in sync). Unknown keys, wrong types and invalid
values raise :class:`ConfigError` with one line that names the key and the closest valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.errors import ConfigError


@dataclass
class DataConfig:
    source: str = "synthetic"
    root: str = ""
    download: bool = False
    cache_dir: str = "~/.cache/launchpad"
    synthetic_classes: int = 6
    synthetic_train_per_class: int = 500
    synthetic_val_per_class: int = 100
    synthetic_seed: int = 0
    image_size: int = 32
    val_crop_fraction: float = 1.0
    random_resized_crop: bool = False
    crop_scale_min: float = 0.35
    hflip: bool = True
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    batch_size: int = 64
    val_batch_size: int = 0
    num_workers: int = 2
    persistent_workers: bool = True
    pin_memory: bool = True
    on_bad_sample: str = "error"
    jpeg_draft: bool = True


@dataclass
class ModelConfig:
    name: str = "smallcnn"
    init: str = "default"
    channels_last: bool = False
    compile: bool = False
    weights: str = "none"
    freeze: str = "none"


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    decay_norm_and_bias: bool = False
    head_lr_mult: float = 1.0


@dataclass
class SchedConfig:
    name: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    step_epochs: float = 10.0
    gamma: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 8
    seed: int = 0
    precision: str = "auto"
    label_smoothing: float = 0.1
    grad_accum_steps: int = 1
    clip_grad_norm: float = 0.0
    on_nonfinite_loss: str = "stop"
    ema_decay: float = 0.0
    cudnn_benchmark: bool = True
    tf32: bool = True
    deterministic: bool = False
    freeze_epochs: int = 0
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0


@dataclass
class CheckpointConfig:
    resume: str = "auto"
    keep_last: int = 2
    metric: str = "val/top1"
    mode: str = "max"
    every_steps: int = 0
    every_minutes: float = 0.0
    warning_signal: str = "SIGUSR1"
    requeue: bool = True
    max_requeues: int = 20


@dataclass
class DistConfig:
    device: str = "auto"
    backend: str = "auto"
    timeout_s: float = 300.0
    find_unused_parameters: bool = False


@dataclass
class LogConfig:
    output_dir: str = "runs"
    name: str = "default"
    every_steps: int = 50
    progress_bar: str = "auto"
    debug: bool = False
    trackers: list[str] = field(default_factory=lambda: ["tensorboard", "jsonl"])
    project: str = "launchpad"
    wandb_mode: str = "offline"
    mlflow_uri: str = ""
    pictures: bool = True
    histogram_every_epochs: int = 0
    graph: bool = False
    profile_steps: str = ""
    peak_tflops: float = 0.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        """The run directory: every file of this run (logs, checkpoints, config) lives here."""
        return Path(os.path.expanduser(self.log.output_dir)) / self.log.name


DATA_SOURCES = ("synthetic", "imagefolder", "cifar10", "cifar100", "mnist", "fashionmnist")
"""The built-in data sources; ``data.source`` may also be an import path (``my_pkg.data:build``)."""

CHOICES: dict[str, tuple[str, ...]] = {
    "data.on_bad_sample": ("error", "skip"),
    "model.init": ("default", "kaiming", "xavier"),
    "optim.name": ("sgd", "adam", "adamw", "adagrad"),
    "sched.name": ("cosine", "step", "constant"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.on_nonfinite_loss": ("stop", "skip"),
    "ckpt.mode": ("max", "min"),
    "ckpt.warning_signal": ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"),
    "dist.device": ("auto", "cpu", "cuda", "mps"),
    "dist.backend": ("auto", "gloo", "nccl"),
    "log.progress_bar": ("auto", "on", "off"),
    "model.freeze": ("none", "backbone"),
    "log.wandb_mode": ("offline", "online"),
}
"""Keys restricted to a set of values (matched case-insensitively, stored as spelled here)."""

POSITIVE = ("data.batch_size", "data.image_size", "train.epochs", "train.grad_accum_steps",
            "optim.lr", "dist.timeout_s", "log.every_steps", "ckpt.keep_last")
NON_NEGATIVE = ("data.val_batch_size", "data.num_workers", "optim.weight_decay", "optim.momentum",
                "train.label_smoothing", "train.clip_grad_norm", "sched.warmup_epochs",
                "sched.min_lr_ratio", "data.synthetic_seed", "train.seed", "ckpt.every_steps",
                "ckpt.every_minutes", "train.ema_decay", "ckpt.max_requeues", "train.freeze_epochs",
                "optim.head_lr_mult", "train.early_stop_patience", "train.early_stop_min_delta",
                "log.histogram_every_epochs", "log.peak_tflops")
TRACKERS = ("tensorboard", "jsonl", "wandb", "mlflow")
"""The values ``log.trackers`` may list."""


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
    layers += [(f"override '{item}'", _parse_override(item)) for item in overrides]
    for origin, layer in layers:
        for key in _leaf_keys(layer):
            if key not in known:
                raise ConfigError(f"unknown key '{key}' in {origin}{_suggest(key, known)}")
    try:  # one merge of all layers: each OmegaConf.merge deep-copies the whole config
        merged = OmegaConf.merge(merged, *(layer for _, layer in layers))
    except OmegaConfBaseException:
        for origin, layer in layers:  # again layer by layer, to name the one at fault
            try:
                merged = OmegaConf.merge(merged, layer)
            except OmegaConfBaseException as exc:
                key = getattr(exc, "full_key", None) or "?"
                raise ConfigError(
                    f"{key}: expected {_type_name(known.get(key))}, got {_value_of(layer, key)!r} "
                    f"(in {origin})") from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    _validate_source(cfg)
    if implied is not None:
        given = {key for _, layer in layers for key in _leaf_keys(layer)}
        for key, value in implied(cfg).items():
            if key not in given:
                _set(cfg, key, value)
    validate(cfg)
    return cfg


def _validate_source(cfg: Config) -> None:
    source = cfg.data.source
    if ":" in source:
        return  # an import path, checked when imported (trainer.sources.check_source)
    canonical = {choice.lower(): choice for choice in DATA_SOURCES}
    if source.lower() not in canonical:
        raise ConfigError(f"data.source: '{source}' is not one of {', '.join(DATA_SOURCES)} nor an import path "
                          f"like my_pkg.data:build{_suggest(source.lower(), canonical, 'value')}")
    cfg.data.source = canonical[source.lower()]


def validate(cfg: Config) -> None:
    """Check values against :data:`CHOICES`, :data:`POSITIVE` and :data:`NON_NEGATIVE`."""
    for key, allowed in CHOICES.items():
        value = str(get(cfg, key)).lower()
        if "on" in allowed:  # YAML reads a bare on/off as a boolean
            value = {"true": "on", "false": "off"}.get(value, value)
        canonical = {choice.lower(): choice for choice in allowed}
        if value not in canonical:
            raise ConfigError(f"{key}: '{get(cfg, key)}' is not one of {', '.join(allowed)}"
                              f"{_suggest(value, canonical, 'value')}")
        _set(cfg, key, canonical[value])
    for key in POSITIVE:
        if not get(cfg, key) > 0:
            raise ConfigError(f"{key}: must be > 0, got {get(cfg, key)}")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {get(cfg, key)}")
    if cfg.ckpt.metric not in (metrics := epoch_metrics(cfg)):
        raise ConfigError(f"ckpt.metric: '{cfg.ckpt.metric}' is not logged{_suggest(cfg.ckpt.metric, metrics, 'metric')}")
    if cfg.train.ema_decay >= 1:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), e.g. 0.999 (0: off), got {cfg.train.ema_decay}")
    if not 0 < cfg.data.crop_scale_min <= 1 or not 0 < cfg.data.val_crop_fraction <= 1:
        raise ConfigError("data.crop_scale_min and data.val_crop_fraction must be in (0, 1]")
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3 or min(cfg.data.std) <= 0:
        raise ConfigError("data.mean and data.std need 3 values each, std > 0, e.g. data.std=[0.25,0.25,0.25]")
    if cfg.data.source in DATA_SOURCES[1:] and not cfg.data.root:
        raise ConfigError(f"data.root: required for data.source={cfg.data.source}, e.g. data.root=/data/{cfg.data.source}")
    if not cfg.log.name or "/" in cfg.log.name:
        raise ConfigError(f"log.name: '{cfg.log.name}' must be a non-empty folder name without '/'")
    cfg.log.trackers = _validate_trackers(cfg.log.trackers)
    profile_range(cfg.log.profile_steps)


def _validate_trackers(names: list[str]) -> list[str]:
    """Lower-cased, without repeats, each one of :data:`TRACKERS`."""
    chosen: list[str] = []
    for name in names:
        key = str(name).lower()
        if key not in TRACKERS:
            raise ConfigError(f"log.trackers: '{name}' is not one of {', '.join(TRACKERS)}"
                              f"{_suggest(key, TRACKERS, 'value')}")
        if key not in chosen:
            chosen.append(key)
    return chosen


def profile_range(text: str) -> tuple[int, int] | None:
    """``log.profile_steps`` as (first, last) optimizer step, both included; None when empty."""
    if not text:
        return None
    first, sep, last = str(text).partition("-")
    if not (first.strip().isdigit() and last.strip().isdigit() and sep) or not 1 <= int(first) <= int(last):
        raise ConfigError(f"log.profile_steps: '{text}' must be FIRST-LAST optimizer steps with "
                          "1 <= FIRST <= LAST, e.g. log.profile_steps=10-15 ('' to turn it off)")
    return int(first), int(last)


VAL_METRICS = ("loss", "top1", "top5", "precision", "recall", "f1")
"""What each validation logs, as ``val/<name>`` (and ``val_ema/<name>`` with an EMA)."""


def epoch_metrics(cfg: Config) -> list[str]:
    """The metrics an epoch logs that ``ckpt.metric`` may choose from."""
    prefixes = ["val/", "val_ema/"] if cfg.train.ema_decay > 0 else ["val/"]
    return [f"{prefix}{name}" for prefix in prefixes for name in VAL_METRICS] + ["train/loss"]


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
        raise ConfigError(f"override '{item}' must look like key=value, e.g. optim.lr=0.1")
    try:
        return OmegaConf.from_dotlist([item])
    except OmegaConfBaseException as exc:
        raise ConfigError(f"override '{item}' could not be parsed: {exc}".splitlines()[0]) from None


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, DictConfig):
        return [prefix.rstrip(".")]
    keys: list[str] = []
    for key in node.keys():
        keys += _leaf_keys(node[key], f"{prefix}{key}.")
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
