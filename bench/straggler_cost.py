"""``python -m bench.straggler_cost``: what timing each rank's own work costs a training step.

The straggler clock (trainer/observe/stragglers.py) adds per micro-batch a forward pre-hook, a
hook on the first parameter's gradient and three calls from the loop; per reporting interval one
all-gather of three numbers over the gloo control group (timed by a 2-process run, see
docs/benchmarks.md). This times the per-micro-batch part: a tiny forward and backward, with and
without the clock, in interleaved rounds; the fastest round's median of each side is compared.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from trainer.observe.stragglers import OwnTime

ROUNDS, STEPS = 400, 50


def _model(watched: bool) -> tuple[nn.Module, OwnTime]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    clock = OwnTime(torch.device("cpu"))
    if watched:
        clock.attach(net, compiled=False)
    return net, clock


def _step(net: nn.Module, clock: OwnTime, watched: bool, x: torch.Tensor) -> float:
    started = time.perf_counter()
    if watched:
        clock.waited(0.0)
        clock.micro_batch_starts()
    net(x).sum().backward()
    if watched:
        clock.micro_batch_ends(True)
    return time.perf_counter() - started


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randn(4, 16)
    sides = {False: _model(False), True: _model(True)}
    medians: dict[bool, list[float]] = {False: [], True: []}
    for index in range(ROUNDS):
        for watched in (False, True) if index % 2 else (True, False):
            net, clock = sides[watched]
            medians[watched].append(statistics.median(_step(net, clock, watched, x) for _ in range(STEPS)))
        sides[True][1].take()  # once per interval, as the loop does
    plain, watched = min(medians[False]), min(medians[True])
    print(f"forward+backward of a 3-layer MLP: {plain * 1e6:.1f} us plain, {watched * 1e6:.1f} us with the "
          f"straggler clock: +{(watched - plain) * 1e6:.1f} us per micro-batch")


if __name__ == "__main__":
    main()
