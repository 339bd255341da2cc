"""Which implementation of the Parallel seam a run gets, from ``dist.strategy``."""

from __future__ import annotations

from trainer.config import DistConfig
from trainer.parallel.distributed import DistEnv
from trainer.parallel.strategy import DataParallel, Parallel


def build(env: DistEnv, cfg: DistConfig, compile_model: bool, precision: str) -> Parallel:
    """``cfg.strategy`` when there is a process group, else the model as it is (one process
    holds it all whatever the strategy)."""
    if not env.is_distributed:
        return Parallel(env, compile_model)
    if cfg.strategy == "ddp":
        return DataParallel(env, compile_model, cfg.find_unused_parameters)
    from trainer.parallel.sharded import FullyShardedParallel  # FSDP's modules only for a sharded run

    shard_size = (cfg.hsdp_shard_size or env.topology.local_world_size) if cfg.strategy == "hsdp" else None
    return FullyShardedParallel(env, precision, cfg.reshard_after_forward, shard_size, compile_model)
