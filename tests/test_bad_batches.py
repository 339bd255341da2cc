"""A micro-batch whose every sample is unreadable: it adds nothing to training, and ranks stay in step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import helpers
import pytest
import torch
from test_data import data_cfg, write_image_folder

from trainer import config, models
from trainer.data import loaders
from trainer.data.stages import Batch, Normalize
from trainer.parallel.distributed import DistEnv, Topology
from trainer.parallel.strategy import Parallel
from trainer.tasks.classification import Classification
from trainer.train import precision
from trainer.train.bad_batches import StandIn
from trainer.train.step import TrainStep

CPU = torch.device("cpu")
SINGLE = DistEnv(Topology(), CPU, None)
NORMALIZE = Normalize([0.5] * 3, [0.25] * 3, CPU)


def small_step() -> TrainStep:
    torch.manual_seed(0)
    net = models.build_model("smallcnn", 3, 16)  # has BatchNorm
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    return TrainStep(net, net, optimizer, Parallel(SINGLE), Classification(), precision.resolve("fp32", CPU), CPU,
                     config.TrainConfig())


def stand_in_for(transform: Callable[[Any], torch.Tensor], size: int) -> StandIn:
    return StandIn(transform, size, lambda count: torch.zeros(count, dtype=torch.long))


def unreadable() -> Batch:
    return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), 4, torch.empty(0, dtype=torch.long))


def on_device(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    return NORMALIZE(batch.images), batch.targets


def state(step: TrainStep) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in step.net.state_dict().items()}


def test_first_batch_stand_in_matches_the_transform_output(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["a"], "val": ["a"]}, per_class=1)
    cfg = data_cfg(image_size=16)
    stand_in = stand_in_for(loaders.build_transform(cfg, True), cfg.image_size)
    batch, swapped = stand_in.swap(unreadable())
    assert swapped and batch.images.shape == (2, 3, 16, 16) and batch.targets.tolist() == [0, 0]
    real = Batch(torch.rand(4, 3, 16, 16).to(torch.uint8), torch.ones(4, dtype=torch.long), 0, torch.arange(4))
    assert stand_in.swap(real)[1] is False
    stand_in.like = None
    stand_in.swap(real)
    assert stand_in.swap(unreadable())[0].images.dtype == torch.uint8  # as the loader


def test_single_process_skips_a_window_of_stand_ins_without_touching_the_model() -> None:
    step = small_step()
    before = state(step)
    batch, swapped = stand_in_for(lambda image: torch.zeros(3, 16, 16), 16).swap(unreadable())
    step.micro_batch(*on_device(batch), window=1, last=True, stand_in=swapped)
    after = state(step)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert step.skipped() == 1 and step.net.training


def test_a_stand_in_adds_nothing_to_its_accumulation_window() -> None:
    """[stand-in, real] in a window of 2 ends with exactly the weights of the real batch alone."""
    torch.manual_seed(1)
    images, targets = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])
    with_stand_in, alone = small_step(), small_step()
    alone.micro_batch(images, targets, window=2, last=True)
    blank, _ = stand_in_for(lambda image: torch.zeros(3, 16, 16), 16).swap(unreadable())
    with_stand_in.micro_batch(*on_device(blank), window=2, last=False, stand_in=True)
    with_stand_in.micro_batch(images, targets, window=2, last=True)
    mine, theirs = state(with_stand_in), state(alone)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine) and with_stand_in.skipped() == 0


@pytest.mark.slow
def test_all_bad_micro_batch_on_one_rank_does_not_hang_two_ranks(tmp_path: Path) -> None:
    """Two gloo ranks, one image per micro-batch, half the images unreadable: some steps find one
    rank with nothing readable while the other has an image. The run ends and counts the skips.

    The same run checks that the ranks share one scan: rank 0 walks each split (its log says so),
    rank 1 only reads the index rank 0 wrote (its full log, ``logs/rank_1.log``, has no walk)."""
    root = tmp_path / "images"
    write_image_folder(root, {"train": ["cat", "dog"], "val": ["cat", "dog"]}, per_class=4)
    bad = {0, 1, 4, 5}  # cat/0, cat/1, dog/0, dog/1 in the index's (sorted) order
    for index in bad:
        (root / "train" / ("cat" if index < 4 else "dog") / f"{index % 4}.png").write_bytes(b"\x89PNG broken")
    sampler = loaders.TrainBatchSampler(8, 2, 0, 1, seed=0)
    lone = 0
    for epoch in range(2):
        sampler.set_position(loaders.Position(epoch, 0))
        order = sampler.order().tolist()
        lone += sum((order[p] in bad) != (order[p + 1] in bad) for p in range(0, 8, 2))
    assert lone > 0  # the case under test occurs in this run
    args = helpers.small_run(tmp_path, "data.source=imagefolder", f"data.root={root}", "data.batch_size=1",
                             "data.on_bad_sample=skip", "train.epochs=2", "model.name=smallcnn", "log.name=bad")
    done = helpers.run(args, nproc=2, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    records = helpers.metrics_lines(tmp_path, "bad")
    epochs = [r for r in records if "data/skipped_samples" in r]
    assert epochs[-1]["data/skipped_samples"] == 8  # 4 unreadable images x 2 epochs
    assert len(epochs) == 2 and all(math.isfinite(r["train/loss"]) for r in epochs)
    logs = helpers.run_dir(tmp_path, "bad") / "logs"
    walks = {rank: (logs / f"rank_{rank}.log").read_text().count(" indexed ") for rank in (0, 1)}
    assert walks == {0: 2, 1: 0}  # train/ and val/, on rank 0 only
