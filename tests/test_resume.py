"""Checkpoints that lose nothing: resume after SIGTERM and SIGKILL, on the same or another world
size and batch size (with mixup and cutmix on), torchrun restarts, one history, unreadable
checkpoints, one run per directory.

All runs are real torchrun (gloo, CPU) or python processes; ``recording_worker.py`` records what
the data set served and each optimizer step's learning rate and dropout mask.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (REPO, TESTS, child_env, last_checkpoint, metrics_lines, run, run_dir, small_run, start,
                     torchrun, wait_for)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.data import loaders

pytestmark = pytest.mark.slow

RECORDING = TESTS / "recording_worker.py"
TRAIN_SIZE = 3 * 64
EPOCHS = 3
MIXING = ("data.mixup_alpha=0.2", "data.cutmix_alpha=1.0")
"""Mixup and cutmix on: their per-batch draws (seed, epoch, offset, rank) must resume bitwise too."""


def args(tmp: Path, name: str, *extra: str, batch_size: int = 8) -> list[str]:
    return small_run(tmp, f"log.name={name}", f"train.epochs={EPOCHS}", "ckpt.every_steps=4", *MIXING, *extra,
                     batch_size=batch_size)


def recorded_run(tmp: Path, name: str, *extra: str, nproc: int = 2, batch_size: int = 8,
                 launcher: list[str] | None = None, **faults: str) -> subprocess.CompletedProcess:
    """A run through recording_worker.py, recording into ``tmp/record/<name>``."""
    folder = tmp / "record" / name
    folder.mkdir(parents=True, exist_ok=True)
    # log.pictures=false: the start grid reads 16 training samples, which "served" would count
    return run(args(tmp, name, "log.pictures=false", *extra, batch_size=batch_size), nproc=nproc, script=RECORDING,
               launcher=launcher,
               env=child_env(RECORD_DIR=str(folder), **faults))


def recorded(tmp: Path, name: str, role: str, rank: int | None = None) -> list[dict[str, Any]]:
    """Every entry ``role`` files of run ``name`` hold (of one rank, or all), in file order."""
    pattern = f"{role}_rank{'*' if rank is None else rank}_pid*.jsonl"
    files = sorted((tmp / "record" / name).glob(pattern), key=lambda p: p.stat().st_mtime)
    return [json.loads(line) for path in files for line in path.read_text().splitlines()]


def math_history(state: dict) -> list[dict]:
    """The per-epoch metrics that must match exactly (timings naturally differ)."""
    timing = ("images_per_s", "data_wait", "time_s", "peak_mem_mb", "tflops", "mfu")
    return [{k: v for k, v in record.items() if not k.endswith(timing)} for record in state["history"]]


def assert_same_run(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), f"weights differ at {key}"
    assert math_history(a) == math_history(b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """An uninterrupted 2-process run (smallcnn: BatchNorm), recorded."""
    tmp = tmp_path_factory.mktemp("resume")
    result = recorded_run(tmp, "uninterrupted")
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp, last_checkpoint(tmp, "uninterrupted")


def stop_with_sigterm(tmp: Path, name: str, at_step: int) -> dict:
    """Run 2 processes until the torchrun agent gets SIGTERM at ``at_step``; the mid-epoch checkpoint."""
    stopped = recorded_run(tmp, name, STOP_AT_STEP=str(at_step))
    assert stopped.returncode != 0 and "checkpoint saved, exit code 3" in stopped.stdout + stopped.stderr
    state = last_checkpoint(tmp, name)
    assert state["position"]["consumed"] > 0, "the stop should land in the middle of an epoch"
    return state


def test_sigterm_mid_epoch_then_resume_is_bitwise_identical(reference: tuple[Path, dict]) -> None:
    tmp, expected = reference
    stopped = stop_with_sigterm(tmp, "sigterm", at_step=15)
    assert 0 < stopped["global_step"] < expected["global_step"]
    resumed = recorded_run(tmp, "sigterm")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "same configuration as the checkpoint" in resumed.stdout
    assert_same_run(last_checkpoint(tmp, "sigterm"), expected)
    # every rank's RNG continues where it stopped: the same dropout masks at the same steps
    for rank in (0, 1):
        assert [s["mask"] for s in recorded(tmp, "sigterm", "steps", rank)] == \
               [s["mask"] for s in recorded(tmp, "uninterrupted", "steps", rank)]


def test_dropout_masks_differ_between_ranks(reference: tuple[Path, dict]) -> None:
    tmp, _ = reference
    masks = [[s["mask"] for s in recorded(tmp, "uninterrupted", "steps", rank)] for rank in (0, 1)]
    assert len(masks[0]) == len(masks[1]) > 0
    assert all(a != b for a, b in zip(*masks))


@pytest.mark.parametrize(("nproc", "batch_size"), [(3, 8), (1, 4)], ids=["3-processes", "1-process-half-batch"])
def test_resume_on_another_world_size_or_batch_sees_each_sample_once_on_the_same_schedule(
        reference: tuple[Path, dict], nproc: int, batch_size: int) -> None:
    tmp, expected = reference
    name = f"reshard-{nproc}x{batch_size}"
    stopped = stop_with_sigterm(tmp, name, at_step=15)
    epoch = stopped["position"]["epoch"]
    resumed = recorded_run(tmp, name, nproc=nproc, batch_size=batch_size)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    changed = next(line for line in resumed.stdout.splitlines() if line.startswith("changed since the checkpoint"))
    assert "world size 2 -> " in changed or "data.batch_size 8 -> 4" in changed
    assert "not bitwise identical" in changed
    assert "(optim.lr 0.1 x 16/256, global batch 16) kept from the start of the run" in changed  # not rescaled

    served = Counter((s["epoch"], s["index"]) for s in recorded(tmp, name, "served") if s["size"] == TRAIN_SIZE)
    for e in range(EPOCHS):
        seen = sorted(index for (served_epoch, index), count in served.items() if served_epoch == e
                      for _ in range(count))
        assert seen == list(range(TRAIN_SIZE)), f"epoch {e + 1} (interrupted: {epoch + 1}) missed or repeated samples"
    final = last_checkpoint(tmp, name)
    assert final["epoch"] == EPOCHS and len(final["history"]) == EPOCHS
    interrupted = final["history"][epoch]
    assert interrupted["train/samples"] == TRAIN_SIZE  # the running loss carried over to the new ranks
    resumed_part = TRAIN_SIZE - stopped["position"]["consumed"]  # images/s counts only what this run trained
    assert interrupted["train/images_per_s"] * interrupted["train/time_s"] == pytest.approx(resumed_part, rel=1e-9)

    # the learning rate is the same function of progress: equal wherever both runs stepped
    reference_lr = {round(s["start"], 12): s["lr"] for s in recorded(tmp, "uninterrupted", "steps", 0)}
    resumed_at = epoch + stopped["position"]["consumed"] / TRAIN_SIZE
    after_stop = [s for s in recorded(tmp, name, "steps", 0) if s["start"] >= resumed_at]
    common = [(s["lr"], reference_lr[round(s["start"], 12)]) for s in after_stop
              if round(s["start"], 12) in reference_lr]
    assert len(common) >= 4
    for lr, expected_lr in common:
        assert abs(lr - expected_lr) <= 1e-9
    assert after_stop[-1]["end"] == pytest.approx(EPOCHS) and after_stop[-1]["lr"] > 0


def test_resume_with_repeated_augmentation_on_another_world_size_serves_the_repeated_order_once(
        tmp_path: Path) -> None:
    """data.ra_reps=2 (with a policy and a smaller training crop): stopped mid-epoch on 2 processes,
    resumed on 3, every epoch serves each (index, repeat) of the repeated global order once."""
    extra = ("data.ra_reps=2", "data.auto_augment=randaugment", "data.train_crop_size=12")
    stopped = recorded_run(tmp_path, "repeats", *extra, STOP_AT_STEP="15")
    assert stopped.returncode != 0 and "checkpoint saved, exit code 3" in stopped.stdout + stopped.stderr
    assert last_checkpoint(tmp_path, "repeats")["position"]["consumed"] > 0
    resumed = recorded_run(tmp_path, "repeats", *extra, nproc=3)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "world size 2 -> 3" in resumed.stdout

    served = Counter((s["epoch"], s["index"], s["repeat"]) for s in recorded(tmp_path, "repeats", "served")
                     if s["size"] == TRAIN_SIZE)
    for epoch in range(EPOCHS):
        sampler = loaders.TrainBatchSampler(TRAIN_SIZE, 1, 0, 8, seed=0, repeats=2)
        sampler.set_position(loaders.Position(epoch))
        expected = Counter((epoch, index, p % 2) for p, index in enumerate(sampler.order().tolist()))
        assert len(expected) == TRAIN_SIZE and len({index for _, index, _ in expected}) == TRAIN_SIZE // 2
        assert {key: count for key, count in served.items() if key[0] == epoch} == expected, f"epoch {epoch + 1}"


def test_logged_validation_equals_trainer_evaluate_with_batchnorm_on_two_processes(
        reference: tuple[Path, dict]) -> None:
    tmp, state = reference
    evaluated = run([str(run_dir(tmp, "uninterrupted") / "checkpoints" / "last.pt"), f"data.cache_dir={tmp / 'cache'}"],
                    module="trainer.evaluate")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    logged = state["history"][-1]
    assert any(k.endswith("running_mean") for k in state["model"]), "the test needs a BatchNorm model"
    assert abs(metrics["loss"] - logged["val/loss"]) <= 1e-6
    assert abs(metrics["top1"] - logged["val/top1"]) <= 1e-6


def test_sigkill_after_an_epoch_line_then_resume_keeps_one_history(reference: tuple[Path, dict]) -> None:
    tmp, expected = reference
    killed = recorded_run(tmp, "sigkill", KILL_AFTER_EPOCH_LINE="2")
    assert killed.returncode != 0
    assert [r["epoch"] for r in metrics_lines(tmp, "sigkill")] == [1, 2]  # epoch 2's line, not its checkpoint
    assert last_checkpoint(tmp, "sigkill")["epoch"] == 1
    assert (run_dir(tmp, "sigkill") / "run.lock").exists()  # the killed job's, taken over below
    resumed = recorded_run(tmp, "sigkill")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_run(last_checkpoint(tmp, "sigkill"), expected)
    assert not (run_dir(tmp, "sigkill") / "run.lock").exists()
    assert [r["epoch"] for r in metrics_lines(tmp, "sigkill")] == [1, 2, 3]
    events = EventAccumulator(str(run_dir(tmp, "sigkill") / "tensorboard"))
    events.Reload()
    for tag in ("val/loss", "train/lr", "train/loss"):
        steps = [event.step for event in events.Scalars(tag)]
        assert len(steps) == len(set(steps)) and steps == sorted(steps), f"{tag}: {steps}"
    assert len(events.Scalars("val/loss")) == EPOCHS


def test_max_restarts_recovers_a_crashed_worker(reference: tuple[Path, dict]) -> None:
    tmp, expected = reference
    result = run(args(tmp, "restarted"), script=TESTS / "crash_once_worker.py",
                 launcher=torchrun(2, "--max-restarts=1"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "rank 1 dies at step" in output and "resumed from" in output
    assert_same_run(last_checkpoint(tmp, "restarted"), expected)


def test_keep_last_and_best_tracking(reference: tuple[Path, dict]) -> None:
    tmp, _ = reference
    result = run(args(tmp, "retention", "ckpt.keep_last=2", "ckpt.metric=val/loss", "ckpt.mode=min"), nproc=2)
    assert result.returncode == 0, result.stdout + result.stderr
    folder = run_dir(tmp, "retention") / "checkpoints"
    steps = sorted(p.name for p in folder.glob("step_*.pt"))
    last = last_checkpoint(tmp, "retention")
    assert steps == [f"step_{last['global_step'] - 4:09d}.pt", f"step_{last['global_step']:09d}.pt"]
    best = torch.load(folder / "best.pt", map_location="cpu", weights_only=True)
    losses = [record["val/loss"] for record in last["history"]]
    assert best["best"] == min(losses) == last["best"]
    assert best["epoch"] == losses.index(min(losses)) + 1
    assert [r["val/loss"] for r in metrics_lines(tmp, "retention")] == losses


# --- single process: unreadable checkpoints, a second run on a live directory ------------------------------

LINEAR = ["model.name=linear", "sched.warmup_epochs=0", "data.synthetic_train_per_class=16"]


def test_a_cut_last_checkpoint_falls_back_to_the_previous_step_file_or_exits_2(tmp_path: Path) -> None:
    first = run(small_run(tmp_path, "log.name=cut", *LINEAR, "train.epochs=2"))
    assert first.returncode == 0, first.stderr
    folder = run_dir(tmp_path, "cut") / "checkpoints"
    previous = sorted(folder.glob("step_*.pt"))[0]
    resumed_at = torch.load(previous, weights_only=True)["global_step"]
    shutil.copytree(run_dir(tmp_path, "cut"), run_dir(tmp_path, "nothing-readable"))

    (folder / "last.pt").write_bytes(b"")  # a hard link: the newest step file is cut too
    continued = run(small_run(tmp_path, "log.name=cut", *LINEAR, "train.epochs=3"))
    assert continued.returncode == 0, continued.stderr
    warnings = [line for line in continued.stderr.splitlines() if "falling back" in line]
    assert len(warnings) == 1 and "last.pt" in warnings[0] and warnings[0].endswith(f"falling back to {previous}")
    assert f"resumed from {previous}" in continued.stdout and f"step {resumed_at}" in continued.stdout
    assert [r["epoch"] for r in metrics_lines(tmp_path, "cut")] == [1, 2, 3]

    copied = run_dir(tmp_path, "nothing-readable") / "checkpoints"
    for path in copied.glob("*.pt"):  # copies, not links: cut them all
        path.write_bytes(path.read_bytes()[:100])
    before = sorted((p.name, p.read_bytes()) for p in copied.iterdir())
    refused = run(small_run(tmp_path, "log.name=nothing-readable", *LINEAR, "train.epochs=3"))
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(f"error: cannot read checkpoint {copied / 'last.pt'}: truncated")
    assert "no older readable checkpoint" in refused.stderr
    assert sorted((p.name, p.read_bytes()) for p in copied.iterdir()) == before
    assert len(metrics_lines(tmp_path, "nothing-readable")) == 2  # never started from scratch


def test_a_second_run_on_a_live_run_directory_exits_2_and_the_first_finishes(tmp_path: Path) -> None:
    first = start(small_run(tmp_path, "log.name=busy", "train.epochs=3", "ckpt.every_steps=2"))
    lock = run_dir(tmp_path, "busy") / "run.lock"
    wait_for(run_dir(tmp_path, "busy") / "checkpoints" / "last.pt", first)
    os.kill(first.pid, signal.SIGSTOP)  # alive, mid-run, for as long as the second run takes to start
    try:
        second = run(small_run(tmp_path, "log.name=busy", "train.epochs=3"))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    output = first.communicate(timeout=300)[0]
    assert second.returncode == 2, second.stdout + second.stderr
    assert second.stderr.count("\n") == 1 and "in use by another run" in second.stderr
    assert f"pid {first.pid} on" in second.stderr
    assert first.returncode == 0, output
    assert [r["epoch"] for r in metrics_lines(tmp_path, "busy")] == [1, 2, 3]
    assert not lock.exists()


SLOW_WRITER = """
import os, sys, time, torch
from pathlib import Path
from trainer import checkpoint
def stalled_fsync(fd):
    print("writing", flush=True)
    time.sleep(60)
os.fsync = stalled_fsync
checkpoint.save_atomic({"model": {"w": torch.full((1000,), 2.0)}}, Path(sys.argv[1]))
"""


def test_sigkill_while_writing_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    from trainer import checkpoint

    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save_atomic({"model": {"w": torch.ones(1000)}}, path)
    before = path.read_bytes()
    writer = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(path)], cwd=REPO, env=child_env(),
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"  # the new bytes are on disk, not yet renamed
    temp_files = [p for p in path.parent.iterdir() if p.name != "last.pt"]
    assert temp_files and temp_files[0].stat().st_size > 0
    writer.kill()
    writer.wait(timeout=30)
    assert path.read_bytes() == before
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(1000))

