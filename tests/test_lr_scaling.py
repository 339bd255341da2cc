"""The learning rate by global batch (optim.lr for optim.lr_base_batch samples), kept across a resume
at another batch size, and the warmup's floor in samples and its start factor."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import last_checkpoint, metrics_lines, run, small_run

from trainer import config
from trainer.config import OptimConfig, SchedConfig
from trainer.errors import ConfigError
from trainer.train import optim


@pytest.mark.parametrize(("name", "scaling", "expected"), [
    ("sgd", "auto", 0.1 * 64 / 256), ("adamw", "auto", 0.1 * math.sqrt(64 / 256)),
    ("adagrad", "auto", 0.1 * math.sqrt(64 / 256)), ("adam", "linear", 0.1 * 64 / 256),
    ("sgd", "sqrt", 0.1 * math.sqrt(64 / 256)), ("my_pkg.optim:build", "auto", 0.1 * 64 / 256)])
def test_the_peak_rate_follows_the_global_batch(name: str, scaling: str, expected: float) -> None:
    peak = optim.PeakLr(OptimConfig(name=name, lr=0.1, lr_base_batch=256, lr_scaling=scaling), 64)
    assert peak.value == pytest.approx(expected, rel=1e-15)
    assert peak.describe().startswith(f"peak lr {expected:.4g} (optim.lr 0.1 x ")
    absolute = optim.PeakLr(OptimConfig(name=name, lr=0.1, lr_base_batch=0, lr_scaling=scaling), 64)
    assert absolute.value == 0.1 and "absolute" in absolute.describe()


def test_warmup_starts_at_its_factor_and_lasts_at_least_its_floor_in_samples() -> None:
    cfg = SchedConfig(name="constant", warmup_epochs=0.5, warmup_start_factor=0.1, warmup_samples_min=300)
    floored = optim.with_warmup_floor(cfg, train_size=200)
    assert floored.warmup_epochs == 1.5 and cfg.warmup_epochs == 0.5  # 300 samples of 200: 1.5 epochs
    assert optim.with_warmup_floor(cfg, train_size=1000).warmup_epochs == 0.5  # the floor is only a floor
    step = 0.1
    factors = [optim.lr_factor(i * step, (i + 1) * step, floored, 4) for i in range(20)]
    assert factors[0] == pytest.approx(0.1 + 0.9 * step / 1.5)  # from the start factor, read at the step's end
    assert all(b > a for a, b in zip(factors[:14], factors[1:15]))  # rising through 1.5 epochs
    assert factors[14] == factors[19] == 1.0
    assert optim.lr_factor(0.0, step, SchedConfig(warmup_epochs=1.0), 4) == pytest.approx(step)  # factor 0: as before


@pytest.mark.parametrize("override", ["sched.warmup_start_factor=1.5", "optim.lr_scaling=cubic",
                                      "optim.lr_base_batch=-1", "sched.warmup_samples_min=-5"])
def test_bad_values_are_refused_in_one_line(override: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config.load([], [override])
    assert override.split("=")[0] in str(refused.value) and "\n" not in str(refused.value)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """One epoch at batch 8, then its resume for a second epoch at batch 16 (one process)."""
    tmp = tmp_path_factory.mktemp("lr")
    common = ["log.name=kept", "sched.name=constant", "sched.warmup_epochs=0", "optim.lr=0.2", "log.pictures=false"]
    first = run(small_run(tmp, *common, "train.epochs=1", batch_size=8))
    assert first.returncode == 0, first.stderr
    second = run(small_run(tmp, *common, "train.epochs=2", batch_size=16))
    assert second.returncode == 0, second.stderr
    return tmp, first.stdout, second.stdout


def test_the_effective_rate_is_printed_and_logged(resumed: tuple[Path, str, str]) -> None:
    tmp, first, _ = resumed
    assert "peak lr 0.00625 (optim.lr 0.2 x 8/256, global batch 8)" in first
    assert metrics_lines(tmp, "kept")[0]["train/lr"] == pytest.approx(0.2 * 8 / 256, rel=1e-12)


def test_a_resume_at_another_batch_keeps_the_rate_and_says_so(resumed: tuple[Path, str, str]) -> None:
    tmp, _, second = resumed
    changed = next(line for line in second.splitlines() if line.startswith("changed since the checkpoint"))
    assert "data.batch_size 8 -> 16" in changed
    assert "peak lr 0.00625 (optim.lr 0.2 x 8/256, global batch 8) kept from the start of the run (global batch 16 " \
           "now)" in changed
    records = metrics_lines(tmp, "kept")
    assert [r["train/global_batch"] for r in records] == [8, 16]
    assert records[1]["train/lr"] == pytest.approx(0.2 * 8 / 256, rel=1e-12)  # not 0.2 x 16/256
    assert last_checkpoint(tmp, "kept")["schedule"]["lr_batch"] == 8
