"""Peak memory of giving a model its starting values, per rank: the whole model built on every
rank (``ddp``) or built without its parameters' memory and initialised shard by shard (``fsdp``).

``torchrun --nproc_per_node=2 -m bench.deferred_build MODEL STRATEGY [WEIGHTS]``: builds the model
as the Worker does (``model.name=MODEL``, 224 px, 1000 classes, ``model.weights=WEIGHTS`` if given),
wraps it with the strategy's Parallel and prints each rank's peak resident memory above what it
held after the imports (``ru_maxrss``, so one strategy per process) and what it holds of the model.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from trainer import config, models
from trainer.observe.memory import max_rss_mb
from trainer.parallel import choice, distributed


def main() -> None:
    name, strategy, weights = sys.argv[1], sys.argv[2], (sys.argv[3:] or ["none"])[0]
    cfg = config.load(overrides=[f"model.name={name}", f"dist.strategy={strategy}", "data.image_size=224",
                                 f"model.weights={weights}"])
    env = distributed.setup(cfg.dist.device, cfg.dist.backend, cfg.dist.timeout_s)
    torch.manual_seed(0)
    before = max_rss_mb()
    parallel = choice.build(env, cfg.dist, False, "fp32")
    if parallel.shards_parameters:
        net, materialise = models.build_deferred(cfg, 1000)
        parallel.wrap(net, models.find_blocks(net))
        materialise(net, env.device)
    else:
        net = models.build_for_training(cfg, 1000)
        parallel.wrap(net)
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in net.parameters()) * 4 / 2**20
    peaks = distributed.all_gather_objects(env, (max_rss_mb() - before, held))
    if env.is_main:
        for rank, (peak, mine) in enumerate(peaks):
            print(f"{name} {strategy} rank {rank}: peak RSS +{peak:.0f} MB while building, "
                  f"holds {mine:.0f} MB of parameters")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
