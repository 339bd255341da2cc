"""Mixup and cutmix (trainer/data/mixing.py) against torchvision's v2.MixUp and v2.CutMix, bitwise:
given the same ratio and box, and given a generator in the same state; the per-batch choice as
timm's Mixup makes it; the soft-target losses against torch's and timm's; the refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import small_run
from test_tasks import in_process_worker
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.data.mixup import mixup_target
from torchvision.transforms import v2

from trainer import config
from trainer.data.mixing import RATIO_STREAM, Mixing, blend, draw_box, paste, soft_targets
from trainer.data.stages import BatchDraw
from trainer.errors import ConfigError
from trainer.tasks.classification import Classification
from trainer.tasks.multilabel import MultiLabel

CLASSES = 5


def batch(count: int = 8, height: int = 13, width: int = 19, multi_hot: bool = False) -> tuple[torch.Tensor, ...]:
    """Normalised-looking fp32 images (not square: rows and columns cannot be swapped unnoticed) and targets."""
    generator = torch.Generator().manual_seed(count)
    images = torch.randn(count, 3, height, width, generator=generator)
    if multi_hot:
        return images, (torch.rand(count, CLASSES, generator=generator) < 0.4).float()
    return images, torch.randint(CLASSES, (count,), generator=generator)


def where(offset: int = 0, rank: int = 0, epoch: int = 0) -> BatchDraw:
    return BatchDraw(0, epoch, offset, rank, torch.arange(8))


class FixedMixUp(v2.MixUp):
    """torchvision's MixUp with a given ratio instead of a draw."""

    def __init__(self, ratio: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ratio = ratio

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"lam": self.ratio}


class FixedCutMix(v2.CutMix):
    """torchvision's CutMix with a given box (and the ratio it implies, as torchvision computes it)."""

    def __init__(self, box: tuple[int, int, int, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.box = box

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        x1, y1, x2, y2 = self.box
        height, width = flat_inputs[0].shape[-2:]
        return {"box": self.box, "lam_adjusted": float(1.0 - (x2 - x1) * (y2 - y1) / (width * height))}


@pytest.mark.parametrize("multi_hot", [False, True], ids=["class-indices", "multi-hot"])
def test_mixup_and_cutmix_equal_torchvisions_given_the_ratio_or_box_bitwise(multi_hot: bool) -> None:
    images, targets = batch(multi_hot=multi_hot)
    for ratio in (0.0, 0.3, 0.77, 1.0):
        expected = FixedMixUp(ratio, num_classes=CLASSES)(images, targets)
        mixed = blend(images, soft_targets(targets, CLASSES), ratio)
        assert all(torch.equal(a, b) for a, b in zip(mixed, expected))
    for box in ((0, 0, 19, 13), (3, 2, 11, 9), (18, 12, 19, 13), (5, 5, 5, 9)):
        expected = FixedCutMix(box, num_classes=CLASSES)(images, targets)
        pasted = paste(images, soft_targets(targets, CLASSES), box)
        assert all(torch.equal(a, b) for a, b in zip(pasted, expected))
    assert torch.equal(images, batch(multi_hot=multi_hot)[0])  # the input is left as it was


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_the_stage_draws_what_torchvision_draws_from_the_same_generator_state(alpha: float) -> None:
    images, targets = batch()
    for offset in range(0, 64, 8):
        draw = where(offset)
        torch.manual_seed(draw.per_batch(RATIO_STREAM).initial_seed())
        expected = v2.MixUp(alpha=alpha, num_classes=CLASSES)(images, targets)
        assert all(torch.equal(a, b) for a, b in zip(Mixing(CLASSES, alpha, 0.0)(images, targets, draw), expected))
        torch.manual_seed(draw.per_batch(RATIO_STREAM).initial_seed())
        expected = v2.CutMix(alpha=alpha, num_classes=CLASSES)(images, targets)
        assert all(torch.equal(a, b) for a, b in zip(Mixing(CLASSES, 0.0, alpha)(images, targets, draw), expected))


def test_cutmix_boxes_cover_the_image_uniformly_and_stay_inside() -> None:
    generator = torch.Generator().manual_seed(0)
    covered = torch.zeros(13, 19)
    for _ in range(4000):
        x1, y1, x2, y2 = draw_box(0.5, 13, 19, generator)
        assert 0 <= x1 <= x2 <= 19 and 0 <= y1 <= y2 <= 13
        covered[y1:y2, x1:x2] += 1
    assert covered.min() > 0  # every pixel, corners included, is pasted over now and then


def test_ranks_offsets_and_epochs_draw_differently_and_a_draw_repeats() -> None:
    images, targets = batch()
    stage = Mixing(CLASSES, 0.2, 1.0)

    def mixed(**at: int) -> torch.Tensor:
        return stage(images, targets, where(**at))[1]

    assert torch.equal(mixed(offset=16, rank=1), mixed(offset=16, rank=1))  # a resume draws the same
    seen = [mixed(offset=offset, rank=rank, epoch=epoch) for offset in (0, 16) for rank in (0, 1) for epoch in (0, 1)]
    assert all(not torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1:])


def test_prob_and_switch_prob_choose_per_batch_as_timms_mixup() -> None:
    def chosen(stage: Mixing) -> list[str | None]:
        return [stage.choose(where(offset)) for offset in range(0, 8 * 2000, 8)]

    both = chosen(Mixing(CLASSES, 0.2, 1.0, prob=0.6, switch_prob=0.25))
    assert 0.56 < 1 - both.count(None) / len(both) < 0.64
    assert 0.21 < both.count("cutmix") / (len(both) - both.count(None)) < 0.29
    assert set(chosen(Mixing(CLASSES, 0.0, 1.0, switch_prob=0.0))) == {"cutmix"}  # the one alpha set wins
    assert set(chosen(Mixing(CLASSES, 0.2, 0.0, switch_prob=1.0))) == {"mixup"}
    images, targets = batch()
    unmixed = Mixing(CLASSES, 0.2, 1.0, prob=0.0)(images, targets, where())
    assert torch.equal(unmixed[0], images)  # left as it is, but the targets take the one form
    assert torch.equal(unmixed[1], torch.nn.functional.one_hot(targets, CLASSES).float())


def test_targets_the_stage_cannot_mix_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"mixing needs class indices or \(N, 5\) targets.*shape \(8, 3\)"):
        Mixing(CLASSES, 0.2, 0.0)(*batch()[:1], torch.zeros(8, 3), where())


def smoothed(soft: torch.Tensor, smoothing: float) -> torch.Tensor:
    return soft * (1 - smoothing) + smoothing / soft.shape[1]


def test_losses_on_soft_targets_equal_torchvisions_and_timms() -> None:
    logits, targets = torch.randn(8, CLASSES, generator=torch.Generator().manual_seed(1)), batch()[1]
    soft = blend(torch.zeros(8, 1), soft_targets(targets, CLASSES), 0.7)[1]
    # cross-entropy: torchvision's recipe is CrossEntropyLoss(label_smoothing) on mixed probabilities
    ce = Classification(0.1)
    assert torch.equal(ce.loss(logits, soft), torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, soft))
    # timm smooths the one-hot targets, then mixes (pairing by flip(0): roll(1, 0) for two samples)
    pair = targets[:2]
    assert torch.allclose(smoothed(blend(torch.zeros(2, 1), soft_targets(pair, CLASSES), 0.7)[1], 0.1),
                          mixup_target(pair, CLASSES, lam=0.7, smoothing=0.1), atol=1e-7)
    assert torch.allclose(ce.loss(logits, soft), SoftTargetCrossEntropy()(logits, smoothed(soft, 0.1)), atol=1e-6)
    # binary cross-entropy: timm's BinaryCrossEntropy on class indices, and on its mixed targets
    for threshold in (0.0, 0.2):
        timm_bce = BinaryCrossEntropy(smoothing=0.1, target_threshold=threshold or None)
        ours = Classification(0.1, "bce", threshold)
        assert torch.allclose(ours.loss(logits, targets), timm_bce(logits, targets), atol=1e-6)
        timm_mixed = BinaryCrossEntropy(target_threshold=threshold or None)(logits, smoothed(soft, 0.1))
        assert torch.allclose(ours.loss(logits, soft), timm_mixed, atol=1e-6)
    multi_hot = batch(multi_hot=True)[1]
    mixed_hot = blend(torch.zeros(8, 1), multi_hot, 0.6)[1]
    assert torch.equal(MultiLabel(bce_target_threshold=0.5).loss(logits, mixed_hot),
                       torch.nn.functional.binary_cross_entropy_with_logits(logits, (mixed_hot > 0.5).float()))


@pytest.mark.parametrize(("overrides", "words"), [
    (["task.name=multilabel", "task.loss=ce"], "task.loss=ce: multilabel's labels are independent"),
    (["task.bce_target_threshold=0.2"], "task.bce_target_threshold=0.2 needs task.loss=bce"),
    (["task.loss=bce", "task.bce_target_threshold=1"], "task.bce_target_threshold: must be in [0, 1)"),
    (["data.mixup_alpha=-0.2"], "data.mixup_alpha: must be >= 0"),
    (["data.mixup_switch_prob=1.5"], "data.mixup_switch_prob: a probability in [0, 1]"),
    (["task.loss=focal"], "task.loss: 'focal' is not one of auto, ce, bce"),
])
def test_combinations_that_make_no_sense_are_refused(overrides: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config.load([], overrides)


def test_bce_on_class_indices_learns_single_label_classes() -> None:
    """Logistic regression on three separable blobs, trained by the task's bce loss: argmax is right."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    targets = torch.randint(3, (300,), generator=generator)
    points = centres[targets] + torch.randn(300, 2, generator=generator)
    layer = torch.nn.Linear(2, 3)
    optimizer = torch.optim.SGD(layer.parameters(), lr=2.0)
    task = Classification(0.1, "bce", 0.2)
    for _ in range(30):
        optimizer.zero_grad()
        task.loss(layer(points), targets).backward()
        optimizer.step()
    assert (layer(points).argmax(1) == targets).float().mean() > 0.95


def test_a_run_with_bce_and_no_mixing_trains_single_label_classes(tmp_path: Path) -> None:
    worker = in_process_worker(small_run(tmp_path, "model.name=linear", "train.epochs=3", "log.pictures=false",
                                         "task.loss=bce", "optim.lr=0.01"))
    assert worker.fit() == 0 and not worker.stages.extra and worker.task.loss_name == "bce"
    first, last = worker.record.history[0], worker.record.history[-1]
    assert last["train/loss"] < first["train/loss"] and last["val/top1"] > first["val/top1"]
    assert not [key for key in last if key.startswith("train/top")]  # no training accuracy is reported
