"""What the Worker trains and validates on: the splits with their transforms, the global-position
batch sampler, the loaders, and the stand-in for a batch with no readable sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from trainer.config import Config
from trainer.data import device_decode, loaders, sources, workers
from trainer.errors import DataError
from trainer.observe.console import log
from trainer.parallel.distributed import DistEnv
from trainer.tasks.base import Task
from trainer.train.bad_batches import StandIn


@dataclass
class Inputs:
    classes: list[str]
    train_set: loaders.SeededTransformDataset
    sampler: loaders.TrainBatchSampler
    train_loader: DataLoader
    val_loader: DataLoader
    stand_in: StandIn
    device_decode: bool
    """``data.decode`` resolved: the loaders leave JPEGs encoded for the device."""
    pictured_set: loaders.SeededTransformDataset
    """The training set as pixels decoded in place (the run's pictures), the same draws as ``train_set``."""


def build_inputs(cfg: Config, env: DistEnv, task: Task) -> Inputs:
    """This rank's loaders over the configured source, in the target form the task learns from."""
    splits = sources.prepared_splits(cfg.data, env, multi_hot=task.target_form == "multi_hot")
    on_device = device_decode.decodes_on_device(cfg.data, env.device)
    skip_bad = cfg.data.on_bad_sample == "skip"
    train_set = loaders.SeededTransformDataset(splits.train, loaders.build_transform(cfg.data, True, on_device),
                                               cfg.train.seed, skip_bad)
    pictured_set = train_set if not on_device else loaders.SeededTransformDataset(
        splits.train, loaders.build_transform(cfg.data, True), cfg.train.seed, skip_bad)
    if len(train_set) < env.world_size:
        raise DataError(f"{len(train_set)} training samples for {env.world_size} processes: each process "
                        "needs at least one; use fewer processes or more data")
    batch = cfg.data.batch_size
    sampler = loaders.TrainBatchSampler(len(train_set), env.world_size, env.rank, batch, cfg.train.seed,
                                        cfg.data.ra_reps)
    batch_bytes = batch * 3 * loaders.train_crop_size(cfg.data) ** 2  # uint8 pixels
    plan = workers.plan(cfg.data.num_workers, env.device.type)
    # A count the user gave needs no telling; the one auto chose does (once, rank 0).
    (log.info if cfg.data.num_workers == workers.AUTO else log.debug)("data: %s", plan.describe(cfg.data.num_workers))
    if plan.main_threads:
        torch.set_num_threads(plan.main_threads)
    if (shm := loaders.shared_memory_warning(plan.workers * env.topology.local_world_size, batch_bytes)):
        log.warning(shm)
    classes = splits.classes
    stand_in = StandIn(train_set.transform, cfg.data.image_size,
                       lambda count: task.stand_in_targets(count, len(classes)))
    train_loader = loaders.build_train_loader(train_set, sampler, cfg.data, env.device, cfg.train.seed + env.rank)
    val_loader = loaders.build_val_loader(splits.val, cfg.data, env.world_size, env.rank, env.device, cfg.train.seed,
                                          on_device)
    if on_device:
        log.info("data.decode=%s: JPEGs decoded on %s, in batches (loader workers read the files)",
                 cfg.data.decode, env.device)
    return Inputs(classes, train_set, sampler, train_loader, val_loader, stand_in, on_device, pictured_set)
