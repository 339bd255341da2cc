"""Training position and schedule: the global sample order, re-sharding at a resume, the
learning rate as a function of progress, and the epoch's last (shorter) accumulation window."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import small_run
from torch.utils.data import DistributedSampler

from trainer import config
from trainer.config import SchedConfig
from trainer.data import loaders
from trainer.parallel import distributed
from trainer.parallel.distributed import DistEnv, Topology
from trainer.parallel.signals import StopRequest
from trainer.parallel.strategy import Parallel
from trainer.train import optim
from trainer.train.worker import Worker


def batches(size: int, world: int, batch: int, position: loaders.Position, seed: int = 7) -> list[list[list[int]]]:
    """Each rank's micro-batches (as indices) from ``position`` to the end of the epoch."""
    out = []
    for rank in range(world):
        sampler = loaders.TrainBatchSampler(size, world, rank, batch, seed)
        sampler.set_position(position)
        out.append([[key.index for key in keys] for keys in sampler])
    return out


def global_batches(size: int, world: int, batch: int, position: loaders.Position) -> list[list[int]]:
    """The global micro-batches, each the union of the ranks' batches in rank-interleaved order."""
    per_rank = batches(size, world, batch, position)
    assert len({len(shard) for shard in per_rank}) == 1, "every rank must take the same number of steps"
    return [sorted(sum((shard[j] for shard in per_rank), [])) for j in range(len(per_rank[0]))]


@pytest.mark.parametrize(("world", "batch"), [(1, 4), (2, 4), (3, 5)])
def test_ranks_share_one_permutation_and_k_batches_consume_a_prefix_of_it(world: int, batch: int) -> None:
    size = 50
    order = loaders.TrainBatchSampler(size, world, 0, batch, seed=7)
    order.set_position(loaders.Position(epoch=3))
    permutation = order.order().tolist()
    consumed: list[int] = []
    for global_batch in global_batches(size, world, batch, loaders.Position(epoch=3)):
        consumed += global_batch
        assert sorted(consumed) == sorted(permutation[:len(consumed)])
    assert sorted(consumed) == list(range(size))  # the shorter last batch too: every sample once


def test_the_order_is_distributed_samplers_permutation() -> None:
    size, world, batch = 48, 2, 4
    shards = batches(size, world, batch, loaders.Position(epoch=5))
    for rank in range(world):
        reference = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=True, seed=7)
        reference.set_epoch(5)
        assert sum(shards[rank], []) == list(reference)


@pytest.mark.parametrize(("before", "after"), [((2, 8), (3, 8)), ((2, 8), (1, 4)), ((3, 5), (2, 7)), ((1, 6), (4, 3))])
def test_a_resume_with_another_world_or_batch_sees_the_rest_of_the_epoch_once(
        before: tuple[int, int], after: tuple[int, int]) -> None:
    size = 100  # every tail here is at least the new world size (see the next test)
    first = global_batches(size, *before, loaders.Position(epoch=1))[:3]
    consumed = sum(len(b) for b in first)
    rest = global_batches(size, *after, loaders.Position(epoch=1, consumed=consumed))
    seen = sum(first, []) + sum(rest, [])
    assert sorted(seen) == list(range(size))


def test_the_rest_of_an_epoch_shares_the_last_full_batch_and_no_rank_goes_empty() -> None:
    sampler = loaders.TrainBatchSampler(450, 1, 0, 32, seed=0)
    assert sampler.global_batches() == [32] * 13 + [17, 17]  # not 14 x 32 and a last step of 2 samples
    sampler = loaders.TrainBatchSampler(50, 2, 0, 8, seed=0)
    assert sampler.global_batches() == [16, 16, 9, 9]
    assert [len(keys) for keys in sampler] == [8, 8, 5, 5]  # rank 0 of 2: 5 + rank 1's 4 = 9
    assert loaders.TrainBatchSampler(7, 3, 0, 1, seed=0).global_batches() == [3, 3]  # 1 left for 3 ranks: left out
    sampler = loaders.TrainBatchSampler(7, 3, 0, 2, seed=0)
    assert sampler.global_batches() == [4, 3]
    sampler.set_position(loaders.Position(0, 3))
    assert sampler.global_batches() == [4]  # less than a global batch left: one batch of 4, split 2/1/1
    assert [len(keys) for keys in sampler] == [2]


# --- the schedule ---------------------------------------------------------------------------------------

def lrs(cfg: SchedConfig, epochs: int, step_epochs: float, base: float = 0.1) -> dict[float, float]:
    """The rate at the start of every step, for steps of ``step_epochs`` of progress."""
    steps = round(epochs / step_epochs)
    return {round(i * step_epochs, 12): base * optim.lr_factor(i * step_epochs, (i + 1) * step_epochs, cfg, epochs)
            for i in range(steps)}


@pytest.mark.parametrize("name", ["cosine", "step", "constant"])
def test_the_rate_is_a_function_of_progress_not_of_steps_per_epoch(name: str) -> None:
    cfg = SchedConfig(name=name, warmup_epochs=0.5, step_epochs=1.0, gamma=0.5, min_lr_ratio=0.01)
    coarse, fine = lrs(cfg, 4, 1 / 8), lrs(cfg, 4, 1 / 24)
    common = [t for t in coarse if t in fine and t >= 0.5]
    assert len(common) >= 20
    for t in common:
        assert abs(coarse[t] - fine[t]) <= 1e-12
    assert 0 < optim.lr_factor(0.0, 1 / 8, cfg, 4) < 1  # warmup moves the very first step
    assert optim.lr_factor(4 - 1 / 8, 4, cfg, 4) > {"cosine": cfg.min_lr_ratio, "step": 0, "constant": 0}[name]


def test_overrides_given_at_a_resume_apply_from_the_resume_point() -> None:
    model = torch.nn.Linear(4, 2)
    before = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(3, 4)).sum().backward()
    before.step()
    saved_schedule = optim.Schedule(before, SchedConfig(warmup_epochs=0), epochs=4)
    saved_schedule.set_window(1.5, 1.6)

    after = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    parallel = Parallel(DistEnv(Topology(), torch.device("cpu"), None))  # what the checkpoint pieces go through
    parallel.load_optimizer_state(model, after, parallel.optimizer_state(model, before))
    schedule = optim.Schedule(after, SchedConfig(warmup_epochs=0), epochs=8)
    schedule.load_state_dict(saved_schedule.state_dict())
    assert after.param_groups[0]["momentum"] == 0.5  # the override, not the checkpoint's 0.9
    momentum = after.state[model.weight]["momentum_buffer"]
    assert torch.equal(momentum, before.state[model.weight]["momentum_buffer"])  # the buffers come back
    assert schedule.lr() == pytest.approx(0.05 * optim.lr_factor(1.5, 1.6, SchedConfig(warmup_epochs=0), 8))


# --- the last accumulation window ------------------------------------------------------------------------

EXACT_LINEAR = ["model.name=linear", "train.label_smoothing=0", "optim.weight_decay=0", "optim.momentum=0",
                "data.random_resized_crop=false", "data.hflip=false", "sched.name=constant", "sched.warmup_epochs=0",
                "optim.lr_base_batch=0"]
LR = 0.5


def test_the_epochs_shorter_last_window_is_scaled_by_its_real_size(tmp_path: Path) -> None:
    """5 batches per epoch, accumulation 2: windows of 2, 2 and 1 batches. The last step must be
    plain SGD on batch 5 alone (its mean loss, not half of it)."""
    cfg = config.load([], small_run(tmp_path, "log.name=accum", *EXACT_LINEAR, f"optim.lr={LR}",
                                    "train.grad_accum_steps=2", "train.epochs=1", "ckpt.every_steps=2",
                                    "data.synthetic_train_per_class=10", batch_size=6))
    worker = Worker(cfg, distributed.setup("cpu"), cfg.run_dir, StopRequest())
    assert len(worker.inputs.sampler) == 5
    assert worker.fit() == 0
    folder = cfg.run_dir / "checkpoints"
    before = torch.load(folder / "step_000000002.pt", weights_only=True)["model"]
    after = torch.load(folder / "last.pt", weights_only=True)
    assert after["global_step"] == 3

    worker.inputs.sampler.set_position(loaders.Position(0, 0))
    last_batch = list(worker.inputs.sampler)[-1]
    samples = [worker.inputs.train_set[key] for key in last_batch]
    x = worker.normalize(torch.stack([image for image, *_ in samples])).flatten(1).double()  # as the step sees it
    y = torch.tensor([target for _, target, *_ in samples])
    weight, bias = before["1.weight"].double(), before["1.bias"].double()
    residual = (torch.softmax(x @ weight.T + bias, dim=1) - torch.nn.functional.one_hot(y, 3)) / len(y)
    expected_weight = weight - LR * residual.T @ x
    expected_bias = bias - LR * residual.sum(0)
    torch.testing.assert_close(after["model"]["1.weight"].double(), expected_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(after["model"]["1.bias"].double(), expected_bias, atol=1e-6, rtol=0)
    halved = weight - LR / 2 * residual.T @ x  # what dividing by grad_accum_steps would give
    assert (halved - expected_weight).abs().max() > 1e-3


# --- counters ----------------------------------------------------------------------------------------------

def test_skip_counters_survive_a_resume(tmp_path: Path) -> None:
    overrides = ["log.name=counters", "model.name=linear", "train.on_nonfinite_loss=skip", "train.epochs=1"]
    cfg = config.load([], small_run(tmp_path, *overrides, "data.synthetic_train_per_class=16"))
    worker = Worker(cfg, distributed.setup("cpu"), cfg.run_dir, StopRequest())
    criterion, calls = worker.task.loss, []

    def nan_on_third_batch(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return criterion(logits, targets) * (float("nan") if len(calls) == 3 else 1.0)

    worker.task.loss = nan_on_third_batch  # type: ignore[method-assign]
    worker.loop.skipped_samples = 5  # as if 5 unreadable samples had been dropped
    assert worker.fit() == 0 and worker.step.skipped_steps == 1

    cfg = config.load([], small_run(tmp_path, *overrides, "data.synthetic_train_per_class=16", "train.epochs=2"))
    resumed = Worker(cfg, distributed.setup("cpu"), cfg.run_dir, StopRequest())
    resumed.resume(cfg.run_dir / "checkpoints" / "last.pt")
    assert (resumed.step.skipped_steps, resumed.loop.skipped_samples, resumed.record.global_step) == \
        (1, 5, worker.record.global_step)
    assert resumed.fit() == 0
    epochs = resumed.record.history
    assert [e["train/skipped_steps"] for e in epochs] == [1, 1]
    assert [e["data/skipped_samples"] for e in epochs] == [5, 5]
