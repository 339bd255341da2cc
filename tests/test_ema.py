"""The weights' moving average: blended every train.ema_steps optimizer steps with the decay raised to
that interval, timm's warmup of the decay, and a bitwise resume between two blends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import small_run
from test_tasks import assert_resume_is_bitwise, in_process_worker

from trainer.train.ema import ModelEma


def set_weight(model: torch.nn.Linear, value: float) -> None:
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)


def test_an_update_every_n_steps_blends_with_the_decay_to_the_nth() -> None:
    model = torch.nn.Linear(2, 1)
    ema = ModelEma(model, decay=0.9, every=4)
    for step in range(1, 9):
        set_weight(model, float(step))
        ema.step()
        if step < 4:
            assert ema.updates == 0  # nothing blended before the 4th step
    assert (ema.steps, ema.updates) == (8, 2)
    expected = 4.0 + (1 - 0.9 ** 4) * (8.0 - 4.0)  # copied at step 4, blended at step 8
    torch.testing.assert_close(ema.module.weight, torch.full_like(model.weight, expected), rtol=1e-6, atol=0)


def test_the_warmup_caps_the_decay_early_on() -> None:
    ema = ModelEma(torch.nn.Linear(2, 1), decay=0.999, warmup=True)
    assert ema.blend_decay() == 0.0  # the first update takes the weights as they are
    ema.steps = 7
    assert ema.blend_decay() == pytest.approx(1 - 8 ** (-2 / 3))  # 0.75, far below 0.999
    ema.steps = 10 ** 7
    assert ema.blend_decay() == 0.999
    every = ModelEma(torch.nn.Linear(2, 1), decay=0.999, every=3, warmup=True)
    every.steps = 7
    assert every.blend_decay() == pytest.approx((1 - 8 ** (-2 / 3)) ** 3)


def test_a_resume_between_two_blends_is_bitwise(tmp_path: Path) -> None:
    args = ["model.name=linear", "train.epochs=2", "train.ema_decay=0.9", "train.ema_steps=3", "train.ema_warmup=true",
            "data.synthetic_train_per_class=16", "log.pictures=false"]
    through, resumed = assert_resume_is_bitwise(
        lambda name: in_process_worker(small_run(tmp_path, *args, f"log.name={name}")), stop_at_step=5)
    assert resumed.step.ema.steps == through.step.ema.steps == 12 and through.step.ema.updates == 4
    for key, value in through.step.ema.module.state_dict().items():
        assert torch.equal(resumed.step.ema.module.state_dict()[key], value), key
