"""The cost of ``train.micro_batch=auto`` when nothing runs out of memory: one blocking agreement
after each forward pass. ``torchrun --nproc_per_node=2 -m bench.micro_batch [--quick]`` on CPU (gloo).

Measures (rank 0 prints):

* the agreement alone (:func:`trainer.parallel.distributed.agree_on_failure`), back to back: wall
  and CPU time per call (CPU time is what a GPU host pays when it runs ahead of its device);
* the real training step (:class:`trainer.train.step.TrainStep`, DDP, ResNet-18 at 64 px, batch 32
  per process), ``fixed`` and ``auto`` in interleaved rounds: milliseconds per optimizer step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from trainer import config
from trainer.parallel import choice, distributed
from trainer.tasks.classification import Classification
from trainer.train import precision
from trainer.train.micro_batch import MicroBatchChoice
from trainer.train.step import TrainStep


def agreement_cost(env: distributed.DistEnv, calls: int, rounds: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds per agreement over ``rounds`` rounds of ``calls`` calls."""
    walls, cpus = [], []
    for _ in range(rounds):
        distributed.barrier(env)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            distributed.agree_on_failure(env, False)
        walls.append((time.perf_counter() - wall) / calls)
        cpus.append((time.process_time() - cpu) / calls)
    return statistics.median(walls), statistics.median(cpus)


def step_cost(env: distributed.DistEnv, steps: int, rounds: int) -> dict[str, float]:
    """Median seconds per optimizer step, fixed and auto, in interleaved rounds of ``steps`` steps."""
    cfg = config.load(overrides=["dist.device=cpu"])
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    parallel = choice.build(env, cfg.dist, False, "fp32")
    model = parallel.wrap(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    step = TrainStep(net, model, optimizer, parallel, Classification(), precision.resolve("fp32", env.device),
                     env.device, cfg.train)
    cuts = {"fixed": MicroBatchChoice.fixed(), "auto": MicroBatchChoice(env, True, 32, 32, 1)}
    images, targets = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))
    times: dict[str, list[float]] = {name: [] for name in cuts}
    for round_ in range(rounds + 1):  # the first round warms up
        for name, cut in cuts.items():
            step.micro_batches, step.cut = cut, cut.train
            distributed.barrier(env)
            start = time.perf_counter()
            for _ in range(steps):
                step.micro_batch(images, targets, 1, True)
            if round_:
                times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and steps")
    quick = parser.parse_args().quick
    env = distributed.setup("cpu", "gloo", 120)
    wall, cpu = agreement_cost(env, 200 if quick else 2000, 5)
    steps = step_cost(env, 2 if quick else 8, 2 if quick else 5)
    if env.is_main:
        print(f"agreement, {env.world_size} gloo ranks: {wall * 1e6:.0f} us wall, {cpu * 1e6:.0f} us CPU per call")
        print(f"ResNet-18 64 px b32 DDP step: fixed {steps['fixed'] * 1e3:.1f} ms, auto {steps['auto'] * 1e3:.1f} ms, "
              f"auto / fixed {steps['auto'] / steps['fixed']:.4f}; agreement / step {wall / steps['fixed']:.2%}")
    distributed.teardown(env)


if __name__ == "__main__":
    main()
