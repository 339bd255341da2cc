"""The configuration schema: one dataclass per section, the single source of truth for every key.

``configs/default.yaml`` mirrors these with comments (a test keeps the two in sync); the tables
below say which values each key may take. :mod:`trainer.config.loading` reads and checks them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


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
    train_crop_size: int = 0  # 0: image_size
    val_resize_size: int = 0  # 0: val_crop_size / val_crop_fraction
    val_crop_size: int = 0  # 0: image_size
    val_crop_fraction: float = 1.0
    random_resized_crop: bool = False
    crop_scale_min: float = 0.35
    hflip: bool = True
    auto_augment: str = "none"  # a torchvision policy in the loader workers, after the crop and flip
    autoaugment_policy: str = "imagenet"  # auto_augment=autoaugment: the policy learnt on this set
    randaugment_ops: int = 2  # auto_augment=randaugment: operations per image
    randaugment_magnitude: int = 9  # auto_augment=randaugment: 0-30
    augmix_severity: int = 3  # auto_augment=augmix: 1-10
    ra_reps: int = 1  # repeated augmentation: each sample this many times per epoch (1: off)
    random_erase: float = 0.0
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) of mixup's ratio, per micro-batch on the device (0: off)
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) of cutmix's ratio (0: off)
    mixup_prob: float = 1.0  # the fraction of micro-batches mixed when an alpha is set (timm's --mixup-prob)
    mixup_switch_prob: float = 0.5  # with both alphas set: the fraction of mixed batches that use cutmix
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    batch_size: int = 64
    val_batch_size: int = 0
    num_workers: Any = "auto"  # an int >= 0 or "auto" (trainer/data/workers.py), checked in config/loading.py
    persistent_workers: bool = True
    pin_memory: bool = True
    on_bad_sample: str = "error"
    jpeg_draft: bool = True
    decode: str = "cpu"  # where JPEGs are decoded: cpu (loader workers) | gpu (the run's device, batched) | auto


@dataclass
class ModelConfig:
    name: str = "smallcnn"
    init: str = "default"
    channels_last: bool = False
    compile: bool = False
    weights: str = "none"
    freeze: str = "none"
    drop_path: Optional[float] = None  # stochastic depth rate (torchvision stochastic_depth_prob, timm drop_path_rate)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1  # the peak rate for a global batch of lr_base_batch samples (see train/optim.py: PeakLr)
    lr_base_batch: int = 256  # 0: optim.lr is the rate itself, whatever the batch
    lr_scaling: str = "auto"  # how the rate follows the batch: auto (sqrt for adaptive optimizers) | linear | sqrt
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    decay_norm_and_bias: bool = False
    head_lr_mult: float = 1.0
    layer_decay: float = 1.0  # ViTs: each block deeper from the head learns at this fraction of the next one's rate


@dataclass
class SchedConfig:
    name: str = "cosine"
    warmup_epochs: float = 1.0
    warmup_samples_min: int = 0  # the warmup lasts at least this many training samples (a floor for small sets)
    warmup_start_factor: float = 0.0  # the warmup rises linearly from this fraction of the peak rate
    min_lr_ratio: float = 0.0
    step_epochs: float = 10.0
    gamma: float = 0.1


@dataclass
class TaskConfig:
    name: str = "classification"
    threshold: float = 0.5
    loss: str = "auto"  # auto (the task's own: ce for classification, bce for multilabel) | ce | bce
    bce_target_threshold: float = 0.0  # bce: targets above it count as 1, the rest as 0 (0: as they are)


@dataclass
class TrainConfig:
    epochs: int = 8
    seed: int = 0
    precision: str = "auto"
    label_smoothing: float = 0.1
    grad_accum_steps: int = 1
    clip_grad_norm: float = 0.0
    on_nonfinite_loss: str = "stop"
    ema_decay: float = 0.0  # per optimizer step, whatever ema_steps
    ema_steps: int = 1  # blend the weights into the average every this many optimizer steps
    ema_warmup: bool = False  # cap the decay early on, as timm's ModelEmaV3 (1 - (1 + step) ** -2/3)
    activation_checkpointing: str = "none"
    cudnn_benchmark: bool = True
    tf32: bool = True
    deterministic: bool = False
    freeze_epochs: int = 0
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0
    micro_batch: str = "fixed"  # fixed | auto (an out-of-memory forward halves the micro-batch on every rank)


@dataclass
class CheckpointConfig:
    resume: str = "auto"
    keep_last: int = 2
    metric: str = "auto"
    mode: str = "max"
    every_steps: int = 0
    every_minutes: float = 0.0
    warning_signal: str = "SIGUSR1"
    requeue: bool = True
    max_requeues: int = 20
    format: str = "auto"  # auto (dcp under fsdp/hsdp with a process group, else file) | file | dcp (sharded folders)
    async_save: bool = False  # dcp: the shards are written in the background while training goes on


@dataclass
class DistConfig:
    device: str = "auto"
    backend: str = "auto"
    timeout_s: float = 300.0
    step_timeout_s: float = 120.0
    flight_recorder: str = "auto"  # auto (on under NCCL) | on | off: torch's record of the last collectives, for hangs
    flight_recorder_entries: int = 20000  # collectives each process keeps (a ring buffer) when the recorder is on
    find_unused_parameters: bool = False
    strategy: str = "ddp"
    shard_blocks: str = "auto"
    reshard_after_forward: bool = True
    hsdp_shard_size: int = 0


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
    straggler_ratio: float = 1.3  # name a rank whose own time per step exceeds the median rank's by this (0: off)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
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


CHOICES: dict[str, tuple[str, ...]] = {
    "data.on_bad_sample": ("error", "skip"),
    "data.decode": ("cpu", "gpu", "auto"),
    "data.auto_augment": ("none", "autoaugment", "randaugment", "trivialaugment", "augmix"),
    "data.autoaugment_policy": ("imagenet", "cifar10", "svhn"),
    "model.init": ("default", "kaiming", "xavier"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.on_nonfinite_loss": ("stop", "skip"),
    "ckpt.mode": ("max", "min"),
    "ckpt.format": ("auto", "file", "dcp"),
    "ckpt.warning_signal": ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"),
    "dist.device": ("auto", "cpu", "cuda", "mps"),
    "dist.backend": ("auto", "gloo", "nccl"),
    "dist.strategy": ("ddp", "fsdp", "hsdp"),
    "dist.flight_recorder": ("auto", "on", "off"),
    "train.activation_checkpointing": ("none", "full", "selective"),
    "train.micro_batch": ("fixed", "auto"),
    "log.progress_bar": ("auto", "on", "off"),
    "model.freeze": ("none", "backbone"),
    "optim.lr_scaling": ("auto", "linear", "sqrt"),
    "log.wandb_mode": ("offline", "online"),
    "task.loss": ("auto", "ce", "bce"),
}
"""Keys restricted to a set of values (matched case-insensitively, stored as spelled here)."""

OPEN_CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("synthetic", "imagefolder", "cifar10", "cifar100", "mnist", "fashionmnist", "prepared"),
    "task.name": ("classification", "multilabel"),
    "optim.name": ("sgd", "adam", "adamw", "adagrad", "lamb", "lars", "lion"),
    "sched.name": ("cosine", "step", "constant"),
}
"""Keys that take a built-in name (matched case-insensitively) or the import path of the user's
builder (``my_pkg.module:build``), checked when it is imported."""

POSITIVE = ("data.batch_size", "data.image_size", "data.ra_reps", "data.randaugment_ops", "train.epochs",
            "train.grad_accum_steps", "train.ema_steps", "optim.lr", "dist.timeout_s", "dist.step_timeout_s",
            "dist.flight_recorder_entries", "log.every_steps", "ckpt.keep_last")
NON_NEGATIVE = ("data.val_batch_size", "data.train_crop_size", "data.val_resize_size", "data.val_crop_size",
                "optim.weight_decay", "optim.momentum",
                "train.label_smoothing", "train.clip_grad_norm", "sched.warmup_epochs",
                "sched.warmup_samples_min", "optim.lr_base_batch",
                "sched.min_lr_ratio", "data.synthetic_seed", "train.seed", "ckpt.every_steps",
                "ckpt.every_minutes", "train.ema_decay", "ckpt.max_requeues", "train.freeze_epochs",
                "optim.head_lr_mult", "train.early_stop_patience", "train.early_stop_min_delta",
                "log.histogram_every_epochs", "log.peak_tflops", "task.threshold",
                "data.mixup_alpha", "data.cutmix_alpha", "dist.hsdp_shard_size")
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("top1", "loss", "top5", "precision", "recall", "f1"),
    "multilabel": ("map", "loss", "f1", "precision", "recall", "f1_macro"),
}
"""What each validation of a built-in task logs (``val/<name>``), first the one a run is judged by
(``ckpt.metric=auto``); checked with the config, before anything is built. A user's task names its own."""

DATA_SOURCES = OPEN_CHOICES["data.source"]
"""The built-in data sources."""
TRACKERS = ("tensorboard", "jsonl", "wandb", "mlflow")
"""The built-in values ``log.trackers`` may list, beside import paths of the user's sinks."""
