"""Checkpoint files: atomic writes, safe loads, hard-linked aliases, retention, weight matching, the
resume fallback, the compatibility check, per-rank pieces, and the run-directory lock."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, BinaryIO, Callable

import pytest
import torch
from torch import nn

from trainer import checkpoint
from trainer.checkpoint import atomic, digest, runlock
from trainer.errors import CheckpointError, ConfigError
from trainer.models.weights import read_weight_file
from trainer.parallel.distributed import DistEnv, Topology


def sample_state(step: int = 7) -> dict[str, Any]:
    torch.manual_seed(step)
    return {"model": {"w": torch.randn(64, 64), "b": torch.arange(5)}, "step": step,
            "config": {"optim": {"lr": 0.1, "name": "sgd"}}, "rng": torch.get_rng_state()}


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype
        else:
            assert a[key] == b[key]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --- save_atomic / load --------------------------------------------------------------------------------

def test_round_trip_loads_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "step_7.pt"
    state = sample_state()
    checkpoint.save_atomic(state, path)
    assert names(path.parent) == ["step_7.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)
    assert raw.pop("digest") == digest.content_digest(state)
    assert_same_state(raw, state)
    assert_same_state(checkpoint.load(path), state)


def test_a_checkpoint_without_a_digest_still_loads(tmp_path: Path) -> None:
    """Checkpoints written before digests existed have none to check."""
    path = tmp_path / "old.pt"
    torch.save(sample_state(), path)
    assert_same_state(checkpoint.load(path), sample_state())


def test_overwrite_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save_atomic(sample_state(1), path)
    checkpoint.save_atomic(sample_state(2), path)
    assert checkpoint.load(path)["step"] == 2
    assert names(tmp_path) == ["last.pt"]


class Unpicklable:
    def __reduce__(self) -> Any:
        raise RuntimeError("cannot pickle this")


def test_object_failing_to_pickle_leaves_previous_file_intact(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save_atomic(sample_state(1), path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        checkpoint.save_atomic({"model": {"w": torch.ones(1000)}, "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert names(tmp_path) == ["last.pt"]


def test_disk_error_half_way_leaves_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save_atomic(sample_state(1), path)
    before = path.read_bytes()

    def half_then_fail(obj: Any, fh: BinaryIO) -> None:
        fh.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is untouched"):
        checkpoint.save_atomic(sample_state(2), path)
    assert path.read_bytes() == before
    assert names(tmp_path) == ["last.pt"]


def test_prune_removes_what_a_killed_writer_left_but_not_its_own_file_in_progress(tmp_path: Path) -> None:
    checkpoint.save_atomic(sample_state(1), tmp_path / "step_1.pt")
    killed = tmp_path / ".step_2.pt.tmp.999999999"   # no such process id
    killed.write_bytes(b"half a checkpoint")
    own = atomic.temporary_name(tmp_path / "step_3.pt")
    own.write_bytes(b"being written")
    assert checkpoint.prune(tmp_path, keep_last=2) == [killed]
    assert names(tmp_path) == sorted([own.name, "step_1.pt"])


def test_a_failed_rewrite_of_the_metrics_log_leaves_it_whole(tmp_path: Path) -> None:
    """metrics.jsonl, per-class metrics and the image index are replaced the same way as checkpoints."""
    path = tmp_path / "metrics.jsonl"
    checkpoint.rewrite_lines(path, ['{"epoch": 1}'])
    with pytest.raises(OSError, match="No space left"):
        with atomic.replacing(path) as file:
            file.write(b'{"epoch": 1}\n{"ep')
            raise OSError(28, "No space left on device")
    assert path.read_text() == '{"epoch": 1}\n' and names(tmp_path) == ["metrics.jsonl"]
    checkpoint.rewrite_lines(path, ['{"epoch": 1}', '{"epoch": 2}'])
    assert path.read_text().splitlines() == ['{"epoch": 1}', '{"epoch": 2}'] and names(tmp_path) == ["metrics.jsonl"]


@dataclasses.dataclass
class Settings:
    lr: float = 0.1


@pytest.mark.parametrize("payload", [Settings(), Path("/etc/passwd")], ids=["dataclass", "pathlib"])
def test_load_refuses_pickled_objects(tmp_path: Path, payload: object) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": payload}, path)
    assert "pickled" in load_error(path)


@pytest.mark.parametrize("cut", [lambda n: 0, lambda n: 1, lambda n: n // 2, lambda n: n - 1],
                         ids=["empty", "one-byte", "half", "all-but-one-byte"])
def test_truncated_checkpoint_is_reported_as_truncated(tmp_path: Path, cut: Callable[[int], int]) -> None:
    path = tmp_path / "step_7.pt"
    checkpoint.save_atomic(sample_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: cut(len(data))])
    message = load_error(path)
    assert "truncated" in message and "pickled" not in message


def test_missing_checkpoint(tmp_path: Path) -> None:
    assert "not found" in load_error(tmp_path / "absent.pt")


def test_tensor_file_without_model_entry_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert "no 'model' entry" in load_error(path)


# --- aliases, retention, latest ------------------------------------------------------------------------

def save_steps(folder: Path, steps: list[int]) -> list[Path]:
    paths = [folder / f"step_{s}.pt" for s in steps]
    for step, path in zip(steps, paths):
        checkpoint.save_atomic(sample_state(step), path)
    return paths


def test_link_atomic_aliases_share_the_step_file_inode(tmp_path: Path) -> None:
    old, new = save_steps(tmp_path, [1, 2])
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    checkpoint.link_atomic(old, last)
    checkpoint.link_atomic(old, best)
    checkpoint.link_atomic(new, last)  # replacing an existing alias
    assert last.stat().st_ino == new.stat().st_ino
    assert best.stat().st_ino == old.stat().st_ino
    assert names(tmp_path) == ["best.pt", "last.pt", "step_1.pt", "step_2.pt"]


def test_prune_keeps_newest_by_step_number_and_never_aliases(tmp_path: Path) -> None:
    paths = save_steps(tmp_path, [5, 9, 10, 100])  # 9 sorts after 100 as text, not as a number
    checkpoint.link_atomic(paths[0], tmp_path / "best.pt")
    checkpoint.link_atomic(paths[-1], tmp_path / "last.pt")

    removed = checkpoint.prune(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["step_5.pt", "step_9.pt"]
    assert set(names(tmp_path)) == {"best.pt", "last.pt", "step_10.pt", "step_100.pt"}
    assert checkpoint.load(tmp_path / "best.pt")["step"] == 5  # the link outlives its pruned step file
    assert checkpoint.prune(tmp_path, keep_last=2) == []


def test_latest_prefers_last_unless_a_newer_step_file_exists(tmp_path: Path) -> None:
    ckpt = checkpoint.checkpoint_dir(tmp_path)
    assert checkpoint.latest(tmp_path) is None
    ckpt.mkdir()
    assert checkpoint.latest(tmp_path) is None
    save_steps(ckpt, [2, 10])
    (ckpt / "notes.pt").write_bytes(b"")  # not a step file
    assert checkpoint.latest(tmp_path) == ckpt / "step_10.pt"
    checkpoint.link_atomic(ckpt / "step_10.pt", ckpt / "last.pt")
    assert checkpoint.latest(tmp_path) == ckpt / "last.pt"
    # A save killed after writing step_10.pt, before pointing last.pt at it: the newer file wins.
    checkpoint.link_atomic(ckpt / "step_2.pt", ckpt / "last.pt")
    assert checkpoint.latest(tmp_path) == ckpt / "step_10.pt"
    # last.pt copied (no hard links) or its step file pruned: it names no step file, and is used.
    (ckpt / "last.pt").unlink()
    shutil.copyfile(ckpt / "step_2.pt", ckpt / "last.pt")
    assert checkpoint.latest(tmp_path) == ckpt / "last.pt"


# --- load_model_weights --------------------------------------------------------------------------------

def classifier(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, num_classes))


def test_load_model_weights_round_trip(tmp_path: Path) -> None:
    source, target = classifier(3), classifier(3)
    checkpoint.load_model_weights(target, source.state_dict(), tmp_path / "x.pt")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_load_model_weights_names_shape_mismatch(tmp_path: Path) -> None:
    target = classifier(5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_model_weights(target, classifier(3).state_dict(), tmp_path / "x.pt")
    message = str(info.value)
    assert "3.weight (3, 8) vs (5, 8)" in message and "3.bias (3,) vs (5,)" in message
    assert "missing" not in message and "unexpected" not in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # untouched


def test_load_model_weights_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_model_weights(classifier(3), other.state_dict(), tmp_path / "x.pt")
    message = str(info.value)
    assert "missing: 3.bias, 3.weight;" in message
    assert "unexpected: 0.bias, 0.weight, 1.num_batches_tracked, 1.running_mean ...;" in message
    assert "1.bias (4,) vs (8,), 1.weight (4,) vs (8, 12)" in message


# --- resume: fallback, compatibility, per-rank sums ----------------------------------------------------

def test_load_for_resume_falls_back_past_a_cut_last_pt_to_the_previous_step(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old, new = save_steps(tmp_path, [4, 8])
    checkpoint.link_atomic(new, tmp_path / "last.pt")
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 cut")  # through the hard link, step_8 is cut too
    state, used = checkpoint.load_for_resume(tmp_path / "last.pt", fall_back=True, announce=True)
    assert used == old and state["step"] == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "last.pt" in warnings[0] and f"falling back to {old}" in warnings[0]


def test_load_for_resume_without_a_readable_file_raises_one_line_naming_the_requested_one(tmp_path: Path) -> None:
    old, new = save_steps(tmp_path, [4, 8])
    last = tmp_path / "last.pt"
    checkpoint.link_atomic(new, last)
    for path in (last, old):
        path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_for_resume(last, fall_back=False, announce=False)
    assert str(info.value).startswith(f"cannot read checkpoint {last}: truncated")
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_for_resume(last, fall_back=True, announce=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"cannot read checkpoint {last}: truncated")
    assert f"no older readable checkpoint in {tmp_path} (step_4.pt unreadable too)" in message


def test_load_for_resume_refuses_another_projects_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="not a checkpoint of this trainer"):
        checkpoint.load_for_resume(path, fall_back=True, announce=False)


def test_changes_name_each_difference_and_those_that_give_up_exactness() -> None:
    saved = {"data": {"batch_size": 8, "num_workers": 2}, "optim": {"lr": 0.1}, "log": {"name": "a"}}
    same = checkpoint.changes_since(saved, saved, 2, 2)
    assert same == ([], [])
    assert "bitwise identical" in checkpoint.describe_changes(*same)
    current = {"data": {"batch_size": 4, "num_workers": 0}, "optim": {"lr": 0.1}, "log": {"name": "b"}}
    changes, inexact = checkpoint.changes_since(saved, current, 2, 3)
    assert changes == ["world size 2 -> 3", "data.batch_size 8 -> 4", "data.num_workers 2 -> 0", "log.name a -> b"]
    assert inexact == ["world size", "data.batch_size"]
    line = checkpoint.describe_changes(changes, inexact)
    assert "\n" not in line and "not bitwise identical" in line and "because of world size, data.batch_size" in line
    neutral = checkpoint.changes_since(saved, {**saved, "data": {"batch_size": 8, "num_workers": 0}}, 2, 2)
    assert "bitwise identical to an uninterrupted run (none" in checkpoint.describe_changes(*neutral)
    # a checkpoint from before a key existed ran with what is now that key's default
    newer = {**saved, "data": {**saved["data"], "ra_reps": 1}}
    defaults = {"data": {"ra_reps": 1}}
    assert checkpoint.changes_since(saved, newer, 2, 2, defaults) == ([], [])
    assert checkpoint.changes_since(saved, {**saved, "data": {**saved["data"], "ra_reps": 2}}, 2, 2, defaults) == \
        (["data.ra_reps 1 -> 2"], ["data.ra_reps"])


def test_restore_refuses_a_checkpoint_of_another_format(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="another format.*missing model"):
        checkpoint.restore({"model": nn.Linear(2, 2)}, {"format": 1, "epoch": 3}, tmp_path / "old.pt")


def single_process(rank: int = 0, world_size: int = 1) -> DistEnv:
    return DistEnv(Topology(rank=rank, world_size=world_size), torch.device("cpu"), None)


def test_rank_sums_go_back_to_their_rank_or_to_rank_0_as_totals() -> None:
    saved = {"per_rank": [[1.5, 10.0], [2.5, 20.0]]}  # written by 2 ranks
    got: dict[int, list[float]] = {}
    for rank in (0, 1):
        piece = checkpoint.RankSums(single_process(rank, 2), list, lambda v, r=rank: got.__setitem__(r, v))
        piece.load_state_dict(saved)
    assert got == {0: [1.5, 10.0], 1: [2.5, 20.0]}
    for rank in (0, 1, 2):
        piece = checkpoint.RankSums(single_process(rank, 3), list, lambda v, r=rank: got.__setitem__(r, v))
        piece.load_state_dict(saved)
    assert got == {0: [4.0, 30.0], 1: [0.0, 0.0], 2: [0.0, 0.0]}  # the totals over ranks are kept
    assert checkpoint.RankSums(single_process(), lambda: [3, 4], print).state_dict() == {"per_rank": [[3.0, 4.0]]}


# --- the run-directory lock -----------------------------------------------------------------------------

def test_a_live_holder_keeps_the_lock_and_a_dead_one_loses_it(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / runlock.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        with pytest.raises(runlock.RunDirectoryBusy, match=f"in use by another run \\(pid {holder.pid} on"):
            runlock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lock = runlock.acquire(tmp_path)  # the holder is dead now: taken over
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [runlock.LOCK_NAME]  # no temporary file left
    lock.release()
    assert not lock.path.exists()


def test_a_holder_on_another_host_keeps_the_lock_unless_it_is_this_slurm_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = tmp_path / runlock.LOCK_NAME
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "job": "41"}))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    with pytest.raises(runlock.RunDirectoryBusy, match="pid 1 on elsewhere"):
        runlock.acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "41")  # the requeued job itself, now on another node
    assert json.loads(runlock.acquire(tmp_path).path.read_text())["job"] == "41"


def test_release_leaves_another_holders_lock_and_restores_an_untouched_folders_mtime(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    os.utime(folder, ns=(1_000_000_000, 2_000_000_000))
    lock = runlock.acquire(folder)
    lock.release()  # a start refused after taking the lock: the folder is as it was
    assert os.listdir(folder) == [] and folder.stat().st_mtime_ns == 2_000_000_000
    lock = runlock.acquire(folder)
    (folder / "metrics.jsonl").write_text("")
    lock.release()  # a run that wrote something keeps its new mtime
    assert folder.stat().st_mtime_ns != 2_000_000_000
    lock = runlock.acquire(folder)
    lock.path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "job": None}))  # taken over by another
    lock.release()
    assert lock.path.exists()


def test_a_damaged_checkpoint_given_as_model_weights_is_refused(tmp_path: Path) -> None:
    checkpoint.save_atomic(sample_state(), tmp_path / "good.pt")
    assert torch.equal(read_weight_file(tmp_path / "good.pt")["w"], sample_state()["model"]["w"])
    damaged = torch.load(tmp_path / "good.pt", weights_only=True)
    damaged["model"]["w"][0, 0] += 1  # under the old digest
    torch.save(damaged, tmp_path / "damaged.pt")
    with pytest.raises(ConfigError, match="damaged.pt' is damaged: its contents do not match its digest"):
        read_weight_file(tmp_path / "damaged.pt")
