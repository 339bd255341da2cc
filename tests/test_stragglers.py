"""Stragglers: a rank slowed on purpose by its data is named with its data wait within two
reporting intervals; an even run names none over ten. Real 2-process gloo runs of a user data set,
read back from the log and TensorBoard; the verdict's rule and the own-time clock on their own."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import child_env, torchrun
from trainer.observe.stragglers import OwnTime, Streaks

SLOW_DATA = '''
import os
import time

import torch
from torch.utils.data import Dataset


class Blobs(Dataset):
    """Class c: noise with channel c brighter. Each training batch of data.batch_size samples takes
    $BATCH_S seconds to read, on rank $SLOW_RANK $SLOW_BATCH_S more."""

    def __init__(self, size, image_size, batch_size=0):
        self.size, self.image_size = size, image_size
        slow = os.environ.get("RANK") == os.environ.get("SLOW_RANK")
        batch_s = float(os.environ["BATCH_S"]) + (float(os.environ.get("SLOW_BATCH_S", "0")) if slow else 0.0)
        self.sleep_s = batch_s / batch_size if batch_size else 0.0

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if self.sleep_s:
            time.sleep(self.sleep_s)
        image = torch.randn(3, self.image_size, self.image_size) * 0.5
        image[index % 3] += 1.0
        return image, index % 3


def build(cfg):
    return Blobs(int(os.environ["TRAIN_SAMPLES"]), cfg.image_size, cfg.batch_size), Blobs(24, cfg.image_size), \\
        ["red", "green", "blue"]
'''

EVERY = 5  # optimizer steps per reporting interval
BATCH = 8
BATCH_S = 0.1
"""Every rank reads a training batch in this time (I/O-bound data): a few times the compute, so that
the CPU contention of a busy 2-core CI host, which really slows one rank or the other for seconds
at a time, cannot make a straggler of an even run."""


def train(code: Path, name: str, intervals: int, **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """A 2-process run of ``intervals`` reporting intervals on the user's data set; its output and run folder."""
    args = ["--code", str(code), "data.source=slowpkg.data:build", "data.image_size=16", f"data.batch_size={BATCH}",
            "data.num_workers=0", f"log.output_dir={code.parent / 'runs'}", f"log.name={name}",
            "log.progress_bar=off", f"log.every_steps={EVERY}", "log.pictures=false", "train.epochs=1",
            "dist.timeout_s=60"]
    samples = str(2 * BATCH * EVERY * intervals)
    result = subprocess.run([*torchrun(2), "-m", "trainer", *args],
                            env=child_env(TRAIN_SAMPLES=samples, BATCH_S=str(BATCH_S), **env),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, code.parent / "runs" / name


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)]
            for tag in events.Tags()["scalars"] if tag.startswith("ranks/")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """An even run over 10 intervals, then one where rank 1 reads each batch 3 steps' time longer."""
    code = tmp_path_factory.mktemp("stragglers") / "src"
    (code / "slowpkg").mkdir(parents=True)
    (code / "slowpkg" / "__init__.py").write_text("")
    (code / "slowpkg" / "data.py").write_text(SLOW_DATA)
    even = train(code, "even", 10)
    record = json.loads((even[1] / "metrics.jsonl").read_text().splitlines()[-1])
    step_s = 2 * BATCH / record["train/images_per_s"]  # the even run's wall time per optimizer step
    slowed = train(code, "slowed", 3, SLOW_RANK="1", SLOW_BATCH_S=f"{3 * step_s:.4f}")
    return {"even": even, "slowed": slowed, "step_s": step_s}  # type: ignore[dict-item]


@pytest.mark.slow
def test_a_rank_slowed_by_its_data_is_named_with_its_data_wait_within_two_intervals(runs) -> None:
    result, run_dir = runs["slowed"]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "straggler: rank" in line]
    assert len(lines) == 1 and lines[0].startswith("WARNING straggler: rank 1 ("), lines
    step = int(lines[0].rsplit("steps up to ", 1)[1].rstrip(")"))
    assert step <= 2 * EVERY, lines[0]
    wait_ms = float(lines[0].split(" ms waiting for data")[0].rsplit(" ", 1)[1])
    compute_ms = float(lines[0].split(" ms computing")[0].rsplit(" ", 1)[1])
    assert wait_ms > 0.7 * 3000 * runs["step_s"] and wait_ms > compute_ms, lines[0]  # its time goes to data
    series = scalars(run_dir)
    slow_wait = [value for _, value in series["ranks/data_wait_ms/rank_1"]]
    fast_wait = [value for _, value in series["ranks/data_wait_ms/rank_0"]]
    assert [step for step, _ in series["ranks/data_wait_ms/rank_1"]] == [EVERY, 2 * EVERY, 3 * EVERY]
    assert min(slow_wait) - max(fast_wait) > 0.7 * 3000 * runs["step_s"], (slow_wait, fast_wait)
    assert [value for _, value in series["ranks/stragglers"]][1:] == [1.0, 1.0]


@pytest.mark.slow
def test_an_even_run_names_no_straggler_over_ten_intervals(runs) -> None:
    result, run_dir = runs["even"]
    assert "straggler: " not in result.stdout + result.stderr
    series = scalars(run_dir)
    assert {"ranks/compute_ms/rank_0", "ranks/compute_ms/rank_1", "ranks/data_wait_ms/rank_0",
            "ranks/own_ms_median", "ranks/own_ms_max"} <= set(series)
    assert [step for step, _ in series["ranks/compute_ms/rank_1"]] == [EVERY * i for i in range(1, 11)]
    assert all(value > 0 for _, value in series["ranks/compute_ms/rank_0"])
    assert all(value == 0 for _, value in series["ranks/stragglers"])


def test_a_rank_is_named_after_two_intervals_in_a_row_over_the_ratio_and_cleared_after_one_under() -> None:
    streaks = Streaks(3, 1.3)
    assert streaks.judge([1.0, 1.5, 1.0]) == (1.0, [], [])  # one interval: not yet
    assert streaks.judge([1.0, 1.0, 1.0]) == (1.0, [], [])  # the run was broken
    assert streaks.judge([1.0, 1.5, 1.1]) == (1.1, [], [])
    assert streaks.judge([1.0, 1.5, 1.1]) == (1.1, [1], [])  # the second in a row
    assert streaks.judge([1.0, 2.0, 1.1]) == (1.1, [], [])  # named once, not every interval
    assert streaks.judge([1.0, 1.2, 1.1]) == (1.1, [], [1])
    assert streaks.judge([1.0, 1.2, 1.1]) == (1.1, [], [])
    pair = Streaks(2, 1.3)  # two ranks: the median is their mean, so 1.3x the mean is 1.86x the other
    assert [pair.judge([1.0, 1.8])[1] for _ in range(2)] == [[], []]
    assert [pair.judge([1.0, 1.9])[1] for _ in range(2)] == [[], [1]]


class SlowLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.03)  # the rank's own compute
        return super().forward(x)


def test_own_time_leaves_out_the_waits_before_the_forward_and_after_the_last_gradient() -> None:
    clock, net = OwnTime(torch.device("cpu")), SlowLinear(4, 4)
    clock.attach(net, compiled=False)
    for boundary in (False, True):  # an accumulating micro-batch, then the one that steps
        clock.waited(0.05)
        clock.micro_batch_starts()
        time.sleep(0.05)  # before the forward: DDP's buffer broadcast, which may wait for a peer
        net(torch.randn(2, 4)).sum().backward()
        time.sleep(0.2)  # after the last gradient: the all-reduce's wait for the peers, the optimizer step
        clock.micro_batch_ends(boundary)
    own, wait, compute = clock.take()  # one optimizer step
    assert wait == pytest.approx(0.1) and 0.06 <= compute < 0.15 and own == pytest.approx(wait + compute), compute
    assert clock.take() == (0.0, 0.0, 0.0)


def test_the_median_step_judges_so_one_held_up_step_makes_no_straggler() -> None:
    clock = OwnTime(torch.device("cpu"))
    for wait in (0.01, 0.01, 0.5, 0.01, 0.01):
        clock.waited(wait)
        clock.micro_batch_starts()
        clock.micro_batch_ends(True)
    own, mean_wait, _ = clock.take()
    assert own == pytest.approx(0.01) and mean_wait == pytest.approx(0.108)
