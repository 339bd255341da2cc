"""The device batch stages: normalisation first, then the training stages in order; per-sample draws
depend on (seed, epoch, sample index) only, per-batch draws on (seed, epoch, offset, rank); random
erasing, mixup and cutmix in a run that resumes bitwise (trainer/data/mixing.py: tests/test_mixing.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import small_run
from test_tasks import assert_resume_is_bitwise, in_process_worker

from trainer.data.erasing import RandomErasing
from trainer.data.mixing import Mixing
from trainer.data.stages import Batch, BatchDraw, DeviceStages, Normalize, _mix32

CPU = torch.device("cpu")


def draw(indices: list[int], epoch: int = 0, offset: int = 0, rank: int = 0, seed: int = 0) -> BatchDraw:
    return BatchDraw(seed, epoch, offset, rank, torch.tensor(indices))


def test_a_sample_draws_the_same_whatever_batch_rank_or_offset_it_falls_in() -> None:
    whole = draw(list(range(12))).per_sample(stream=0)
    split = torch.cat([draw([0, 1, 2, 3, 4], offset=0, rank=0).per_sample(0),
                       draw([5, 6, 7, 8, 9, 10, 11], offset=5, rank=1).per_sample(0)])
    assert torch.equal(whole, split)
    shuffled = draw([11, 3, 7]).per_sample(0)
    assert torch.equal(shuffled, whole[[11, 3, 7]])


def test_per_sample_draws_change_with_epoch_seed_and_stream_and_look_uniform() -> None:
    indices = list(range(20_000))
    base = draw(indices).per_sample(0)
    for other in (draw(indices, epoch=1).per_sample(0), draw(indices, seed=1).per_sample(0),
                  draw(indices).per_sample(1)):
        assert (other != base).float().mean() > 0.99
    assert base.dtype == torch.float32 and 0 <= base.min() and base.max() < 1
    assert abs(base.mean().item() - 0.5) < 0.01 and abs(base.var().item() - 1 / 12) < 0.005
    assert abs(torch.corrcoef(torch.stack([base[:-1], base[1:]]))[0, 1].item()) < 0.03  # neighbours unrelated


def test_per_batch_draws_differ_between_ranks_and_offsets_and_repeat_exactly() -> None:
    def numbers(**where: int) -> torch.Tensor:
        return torch.rand(4, generator=draw([0], **where).per_batch(stream=0))

    assert torch.equal(numbers(offset=64, rank=1), numbers(offset=64, rank=1))  # a resume draws the same
    seen = {tuple(numbers(offset=offset, rank=rank).tolist()) for offset in (0, 64) for rank in (0, 1)}
    assert len(seen) == 4


def test_the_stages_run_after_the_copy_in_order_normalisation_first() -> None:
    calls: list[str] = []

    def erase_first_sample(images: torch.Tensor, targets: torch.Tensor,
                           where: BatchDraw) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(f"erase {images.dtype} {where.indices.tolist()} epoch {where.epoch} offset {where.offset}")
        images = images.clone()
        images[0] = 0.0
        return images, targets

    stages = DeviceStages(Normalize([0.5] * 3, [0.25] * 3, CPU), CPU, seed=0, extra=[erase_first_sample])
    pixels = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    images, targets = stages(Batch(pixels, torch.tensor([1, 2]), 0, torch.tensor([7, 9])), epoch=3, offset=16)
    assert calls == ["erase torch.float32 [7, 9] epoch 3 offset 16"]
    assert torch.equal(images[0], torch.zeros(3, 4, 4)) and torch.allclose(images[1], torch.full((3, 4, 4), 2.0))
    assert targets.tolist() == [1, 2]


def test_random_erasing_zeroes_one_rectangle_per_chosen_sample_in_every_channel() -> None:
    count, size = 2000, 16
    images = torch.ones(count, 3, size, size)
    erased, _ = RandomErasing(0.5)(images, torch.zeros(count), draw(list(range(count))))
    zeros = erased == 0
    assert torch.equal(zeros[:, 0], zeros[:, 1]) and torch.equal(zeros[:, 0], zeros[:, 2])
    areas = zeros[:, 0].flatten(1).sum(1)
    chosen = areas > 0
    assert 0.45 < chosen.float().mean() < 0.55  # p = 0.5 (a few rectangles do not fit)
    for mask in zeros[chosen, 0][:100]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert mask.sum() == len(rows) * len(cols)  # one solid rectangle
        assert 0.02 * size * size - size <= mask.sum() <= 0.33 * size * size + size
    assert torch.equal(images, torch.ones_like(images))  # the input is left as it was


def test_random_erasing_of_a_sample_does_not_depend_on_its_batch() -> None:
    images = torch.ones(12, 3, 16, 16)
    whole, _ = RandomErasing(0.7)(images, torch.zeros(12), draw(list(range(12))))
    head, _ = RandomErasing(0.7)(images[:5], torch.zeros(5), draw(list(range(5)), rank=0))
    tail, _ = RandomErasing(0.7)(images[5:], torch.zeros(7), draw(list(range(5, 12)), offset=5, rank=1))
    assert torch.equal(whole, torch.cat([head, tail]))


def test_a_run_with_random_erasing_mixup_and_cutmix_resumes_bitwise(tmp_path: Path) -> None:
    """The erasing is drawn per sample from (seed, epoch, index), mixup and cutmix per micro-batch from
    (seed, epoch, offset, rank): a stop and resume draws the same. The soft targets train with bce."""
    args = ["model.name=linear", "train.epochs=2", "log.pictures=false", "data.random_erase=0.5",
            "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "task.loss=bce", "task.bce_target_threshold=0.2"]
    through, _ = assert_resume_is_bitwise(lambda name: in_process_worker(small_run(tmp_path, *args,
                                                                                   f"log.name={name}")))
    erasing, mixing = through.stages.extra
    assert isinstance(erasing, RandomErasing) and isinstance(mixing, Mixing)


def test_the_draw_keys_hash_python_ints_as_the_samples_tensors() -> None:
    words = [0, 1, 7, 2 ** 31 - 1, 2 ** 32 - 1, 2 ** 40 + 3, 123_456_789]
    assert [_mix32(word) for word in words] == _mix32(torch.tensor(words)).tolist()
