"""Writes that meet a fault: a full disk, a read-only run directory, a save killed at a random moment.

* A checkpoint or a metrics.jsonl line that cannot be written stops the run with one line naming
  the disk and what to do (exit 2); the previous checkpoint stays loadable, and once there is space
  the same command (``ckpt.resume=auto``) continues exactly as an uninterrupted run.
* TensorBoard, the rank log file and per_class.json on a full disk turn off with one warning each,
  naming the disk, and training goes on unchanged.
* A read-only run directory is refused at start, in one line, before any training.
* A process saving checkpoints, SIGKILLed at random moments: the checkpoint ``ckpt.resume=auto``
  picks is always the newest complete one, and no temporary file passes for a checkpoint; the same
  for sharded (DCP) checkpoint folders.

Full and read-only disks are real tmpfs mounts (root, as in CI; skipped with the reason otherwise),
unmounted whatever the outcome. ``KILLED_SAVES=1000`` (``make faults``) kills more saves than
CI's 30.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from helpers import TESTS, child_env, run, small_run
from refusals import error_line, snapshot, snapshot_diff, tmpfs

from trainer import checkpoint
from trainer.checkpoint import sharded

pytestmark = pytest.mark.slow

FULL_DISK_WORKER = TESTS / "full_disk_worker.py"
KILLED_SAVES = int(os.environ.get("KILLED_SAVES", "30"))
TIMING = ("images_per_s", "data_wait", "time_s", "peak_mem_mb", "tflops", "mfu")


def run_args(tmp: Path, output_dir: Path, name: str, *extra: str) -> list[str]:
    """Two epochs of 6 steps; checkpoints at steps 4, 6 (epoch 1 ends), 8 and 12."""
    return small_run(tmp, f"log.output_dir={output_dir}", f"log.name={name}", "train.epochs=2",
                     "ckpt.every_steps=4", *extra, train_per_class=16, val_per_class=4)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the timings (which naturally differ between runs)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if not k.endswith(TIMING)} for record in records]


def assert_same_as(run_dir: Path, reference: Path) -> None:
    """The same final step, weights and per-epoch metrics (in the checkpoint and metrics.jsonl)."""
    ours = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    theirs = checkpoint.load(reference / "checkpoints" / "last.pt")
    assert (ours["global_step"], ours["epoch"]) == (theirs["global_step"], theirs["epoch"]) == (12, 2)
    for key, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][key], tensor), f"weights differ at {key}"
    assert metrics(run_dir) == metrics(reference)
    assert len(metrics(run_dir)) == 2


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp.*"))


def remount(mountpoint: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mountpoint)], check=True, capture_output=True)


def fill(folder: Path) -> None:
    """Take every free byte of ``folder``'s (small) filesystem."""
    with open(folder / "filler.bin", "wb", buffering=0) as file:
        for chunk in (1 << 20, 4096, 1):
            with pytest.raises(OSError, match="No space left"):
                while True:
                    file.write(bytes(chunk))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference(work: Path) -> Path:
    """The uninterrupted run every faulted one must end up identical to."""
    proc = run(run_args(work, work / "runs", "reference"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work / "runs" / "reference"


# ------------------------------------------------------------------------- a full disk stops the run

def test_full_disk_at_a_checkpoint_stops_with_one_line_then_resumes_exactly(work: Path, reference: Path) -> None:
    """Room for one checkpoint: the second (step 6) fails; with room again the run goes on."""
    size_kib = int((reference / "checkpoints" / "last.pt").stat().st_size * 1.5) // 1024
    with tmpfs(work / "ckpt-disk", f"size={size_kib}k") as disk:
        run_dir = disk / "run"
        args = run_args(work, disk, "run", "log.trackers=[jsonl]")  # TensorBoard's thread could meet the full disk too
        stopped = run(args)
        assert stopped.returncode == 2, stopped.stdout[-2000:] + stopped.stderr[-2000:]
        line = error_line(stopped)
        for words in (f"could not write checkpoint {run_dir}/checkpoints/step_000000006.pt",
                      f"No space left on device on {disk}, ", "the previous checkpoint is untouched",
                      "free some space there", "ckpt.resume=auto"):
            assert words in line, line
        folder = run_dir / "checkpoints"
        assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step_000000004.pt"]
        assert checkpoint.load(checkpoint.latest(run_dir))["global_step"] == 4

        remount(disk, f"size={size_kib * 4}k")
        resumed = run(args)
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert f"resumed from {folder / 'last.pt'}" in resumed.stdout
        assert resumed.stderr.strip() == ""
        assert_same_as(run_dir, reference)
        assert temp_files(run_dir) == []


@pytest.mark.parametrize("full_at", ["checkpoint", "jsonl"])
def test_full_disk_stops_every_rank_with_its_line(work: Path, reference: Path, full_at: str) -> None:
    """Two processes: rank 1 stops with rank 0's line, not as if rank 0's host had died."""
    size_kib = int((reference / "checkpoints" / "last.pt").stat().st_size * 1.5) // 1024
    with tmpfs(work / f"{full_at}-disk-2", f"size={size_kib * 4 if full_at == 'jsonl' else size_kib}k") as disk:
        args = run_args(work, disk, "run", "log.trackers=[jsonl]")
        if full_at == "checkpoint":  # 3 steps per epoch on 2 ranks: room for the step-3 checkpoint only
            proc, written, kept = run(args, nproc=2), "checkpoint {disk}/run/checkpoints/step_000000004.pt", 3
        else:  # the first epoch's line (a new file: it needs a page), after a step-2 checkpoint
            proc = run([*args, "ckpt.every_steps=2"], nproc=2, script=FULL_DISK_WORKER,
                       env=child_env(FULL_DURING="jsonl"))
            written, kept = "{disk}/run/metrics.jsonl", 2
        assert proc.returncode != 0, proc.stdout[-2000:]
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
        expected = f"could not write {written.format(disk=disk)} (No space left on device on {disk}"
        assert f"error: {expected}" in [line[:len(expected) + 7] for line in lines], proc.stderr
        assert all(expected in line for line in lines), proc.stderr  # rank 1 says the same, if torchrun lets it
        assert "lost rank" not in proc.stderr
        assert checkpoint.load(checkpoint.latest(disk / "run"))["global_step"] == kept


def test_full_disk_at_metrics_jsonl_stops_with_one_line_then_resumes_exactly(work: Path, reference: Path) -> None:
    """The disk is full while the first metrics.jsonl line is written (after the step-4 checkpoint)."""
    with tmpfs(work / "jsonl-disk", "size=16m") as disk:
        run_dir = disk / "run"
        args = run_args(work, disk, "run", "log.trackers=[jsonl]")  # no TensorBoard thread in that moment
        stopped = run(args, script=FULL_DISK_WORKER, env=child_env(FULL_DURING="jsonl"))
        assert stopped.returncode == 2, stopped.stdout[-2000:] + stopped.stderr[-2000:]
        line = error_line(stopped)
        for words in (f"could not write {run_dir}/metrics.jsonl", f"No space left on device on {disk}, 0 B of",
                      "the previous checkpoint is untouched", "ckpt.resume=auto"):
            assert words in line, line
        assert (run_dir / "metrics.jsonl").read_bytes() == b"", "a cut line was left in metrics.jsonl"
        assert checkpoint.load(checkpoint.latest(run_dir))["global_step"] == 4

        resumed = run(args)
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert "resumed from" in resumed.stdout and resumed.stderr.strip() == ""
        assert_same_as(run_dir, reference)
        assert temp_files(run_dir) == []


def test_a_metrics_line_cut_by_a_full_disk_is_taken_back(work: Path) -> None:
    """The line fits partly in the file's last block: the part written is cut off again."""
    from trainer.errors import StorageError
    from trainer.observe.trackers import JsonlSink

    with tmpfs(work / "append-disk", "size=8k") as disk:
        path = disk / "metrics.jsonl"
        path.write_text(json.dumps({"epoch": 1, "pad": "x" * 3980}) + "\n")  # 4004 bytes of a 4096-byte block
        fill(disk)
        before = path.read_bytes()
        with pytest.raises(StorageError, match=f"could not write {path} \\(No space left on device on {disk}, 0 B"):
            JsonlSink(path).epoch({"epoch": 2, "pad": "y" * 500}, 12)
        assert path.read_bytes() == before


# ----------------------------------------------------------------- a full disk turns a sink off

def test_full_disks_turn_tensorboard_the_log_file_and_per_class_off(work: Path, reference: Path) -> None:
    """tensorboard/ and logs/ on full filesystems of their own; the run directory's disk full while
    the first per_class.json is written. Three warnings, and the same run as the reference."""
    with ExitStack() as mounts:
        disk = mounts.enter_context(tmpfs(work / "sink-disk", "size=16m"))
        run_dir = disk / "run"
        full = {}
        for name in ("tensorboard", "logs"):
            full[name] = mounts.enter_context(tmpfs(run_dir / name, "size=4k"))
            fill(full[name])
        proc = run(run_args(work, disk, "run"), script=FULL_DISK_WORKER, env=child_env(FULL_DURING="per_class"))
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
        warnings = proc.stderr.strip().splitlines()
        assert len(warnings) == 3, proc.stderr
        expected = {
            "tensorboard": f"No space left on device on {full['tensorboard']}, 0 B of 4.0 KiB free",
            f"the log file {full['logs']}/rank_0.log": f"No space left on device on {full['logs']}, 0 B of",
            "per_class.json": f"No space left on device on {disk}, 0 B of 16.0 MiB free",
        }
        for what, where in expected.items():
            (found,) = [w for w in warnings if w.startswith(f"WARNING {what} is off for the rest of this run")]
            assert where in found and found.endswith("training goes on"), found
        assert "done: val/top1" in proc.stdout
        assert_same_as(run_dir, reference)
        assert not (run_dir / "per_class.json").exists() and temp_files(run_dir) == []


# --------------------------------------------------------------------- a read-only run directory

def test_read_only_run_directory_is_refused_at_start(work: Path, reference: Path) -> None:
    """A finished run continued (train.epochs=3) on a filesystem remounted read-only."""
    with tmpfs(work / "ro-disk", "size=16m") as disk:
        run_dir = shutil.copytree(reference, disk / "run", copy_function=shutil.copy2)
        remount(disk, "ro")
        before = snapshot(disk)
        proc = run(run_args(work, disk, "run", "train.epochs=3"))
        assert snapshot_diff(before, snapshot(disk)) == []
        assert proc.returncode == 2, proc.stdout[-2000:]
        line = error_line(proc)
        assert line == (f"error: cannot write the run directory {run_dir} (Read-only file system); "
                        "choose a writable log.output_dir"), line
        assert "epoch 3/3" not in proc.stdout and "first optimizer step" not in proc.stdout


# ------------------------------------------------------------------- SIGKILL in the middle of a save

def weights(step: int) -> dict[str, Any]:
    """A checkpoint whose contents say which step wrote it (256 KiB of weights: a save takes a while)."""
    return {"model": {"w": torch.full((64, 1024), float(step))}, "global_step": step}


def save_file(folder: Path, step: int) -> None:
    """What a run's rank 0 does at each save (a step file, ``last.pt``, every third ``best.pt``, pruning)."""
    checkpoint.save_step(weights(step), folder, step, best=step % 3 == 0, keep_last=2)


def save_forever(folder: Path, done_fd: int, save: Callable[[Path, int], None]) -> None:
    """``save`` one step after the other from the newest checkpoint on, telling ``done_fd`` each
    step whose save returned; runs until killed."""
    torch.set_num_threads(1)
    found = checkpoint.latest(folder.parent)
    step = checkpoint.load(found, whole=False)["global_step"] if found else 0
    while True:
        step += 1
        save(folder, step)
        os.write(done_fd, f"{step}\n".encode())


def kill_a_saver(folder: Path, save: Callable[[Path, int], None], delay: float) -> tuple[int, list[int]]:
    """A forked process saving with ``save`` in a loop, SIGKILLed after ``delay`` seconds: its pid
    and the steps whose save returned before."""
    read_fd, write_fd = os.pipe()
    child = multiprocessing.get_context("fork").Process(target=save_forever, args=(folder, write_fd, save),
                                                        daemon=True)
    child.start()
    os.close(write_fd)
    time.sleep(delay)
    child.kill()
    child.join()
    with os.fdopen(read_fd) as done:
        return child.pid, [int(line) for line in done.read().split()]


def test_kill_during_save_leaves_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    """Start a saving process, SIGKILL it at a random moment, check what a resume would find; again."""
    folder = checkpoint.checkpoint_dir(tmp_path)
    folder.mkdir()
    rng = random.Random(28)
    reported, since_prune, mid_write, unlinked = 0, [], 0, 0
    for _ in range(KILLED_SAVES):
        pid, steps_done = kill_a_saver(folder, save_file, rng.uniform(0.0, 0.15))
        since_prune = [pid] if steps_done else [*since_prune, pid]
        reported = max([reported, *steps_done])

        steps = checkpoint.step_files(folder)
        for path in steps + [folder / "last.pt", folder / "best.pt"]:  # every checkpoint name: a whole file
            if path.exists():
                state = checkpoint.load(path)
                assert torch.equal(state["model"]["w"], weights(state["global_step"])["model"]["w"]), path
                if path in steps:
                    assert state["global_step"] == int(path.stem.split("_")[1]), path
        found = checkpoint.latest(tmp_path)
        if reported == 0 and found is None:
            continue
        state, used = checkpoint.load_for_resume(found, fall_back=True, announce=False)
        assert used == found, f"resume had to fall back from {found}"
        newest = int(steps[-1].stem.split("_")[1])
        assert state["global_step"] == newest >= reported, (found, newest, reported)

        leftovers = temp_files(folder)
        assert all(int(p.name.rsplit(".", 1)[1]) in since_prune for p in leftovers), (leftovers, since_prune)
        mid_write += any(pid == int(p.name.rsplit(".", 1)[1]) for p in leftovers)
        last = folder / "last.pt"
        unlinked += not last.exists() or last.stat().st_ino != steps[-1].stat().st_ino

    assert reported > 0, "no save ever completed before the kill"
    assert mid_write > 0, "no kill landed while a checkpoint was being written"
    checkpoint.save_step(weights(reported + 100), folder, reported + 100, best=False, keep_last=2)
    assert temp_files(folder) == [], "a killed writer's temporary file outlived the next save"
    print(f"{KILLED_SAVES} kills: {reported} saves completed, {mid_write} kills mid-write, "
          f"{unlinked} between a step file and last.pt")


def save_sharded(folder: Path, step: int) -> None:
    """What one process of an fsdp run does at each save, without a process group (as
    train/checkpointing.py makes it): DCP shards into a hidden folder, ``pieces.pt`` with their
    digests, the rename, ``last.ptr`` (every third ``best.ptr``), pruning."""
    best = step % 3 == 0
    state = weights(step)
    tensors = sharded.split(state)
    tmp = sharded.temporary_folder(folder, step)
    sharded.write_shards(tensors, tmp)
    pieces = {**state, sharded.SHARDS: sharded.digests(tmp)}
    sharded.publish(tmp, folder, step, best, lambda path: checkpoint.save_atomic(pieces, path))
    checkpoint.prune(folder, keep_last=2)


def test_kill_during_a_sharded_save_leaves_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    """The same for DCP folders: ``last.ptr``, ``best.ptr`` and every ``step_*`` folder name a complete
    checkpoint whose files match their digests, a resume finds the newest, and a killed writer's
    hidden folder goes at the next save."""
    folder = checkpoint.checkpoint_dir(tmp_path)
    folder.mkdir()
    rng = random.Random(25)
    reported, mid_write = 0, 0
    for _ in range(max(10, KILLED_SAVES // 3)):
        pid, steps_done = kill_a_saver(folder, save_sharded, rng.uniform(0.05, 0.6))
        reported = max([reported, *steps_done])
        steps = checkpoint.step_files(folder)
        for path in [*steps, folder / "last.ptr", folder / "best.ptr"]:
            if path.exists():
                state = checkpoint.load(path)  # checks every file's digest
                assert torch.equal(state["model"]["w"], weights(state["global_step"])["model"]["w"]), path
        found = checkpoint.latest(tmp_path)
        if found is None:
            assert reported == 0
            continue
        state, used = checkpoint.load_for_resume(found, fall_back=True, announce=False)
        assert used == found, f"resume had to fall back from {found}"
        assert state["global_step"] == int(steps[-1].name.split("_")[1]) >= reported, (found, reported)
        mid_write += any(p.is_dir() for p in folder.glob(f".*.tmp.{pid}"))
    assert reported > 0 and mid_write > 0, (reported, mid_write)
    save_sharded(folder, checkpoint.load(checkpoint.latest(tmp_path), whole=False)["global_step"] + 1)
    hidden = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert hidden == [], f"a killed writer's folders outlived the next save: {hidden}"
