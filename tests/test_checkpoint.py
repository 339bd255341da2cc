"""Checkpoint files: atomic writes, safe loads, hard-linked aliases, retention, weight matching."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, BinaryIO, Callable

import pytest
import torch
from torch import nn

from trainer import checkpoint
from trainer.errors import CheckpointError


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
    assert_same_state(torch.load(path, weights_only=True), state)
    assert_same_state(checkpoint.load(path), state)


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


def test_latest_prefers_last_then_newest_step(tmp_path: Path) -> None:
    ckpt = checkpoint.checkpoint_dir(tmp_path)
    assert checkpoint.latest(tmp_path) is None
    ckpt.mkdir()
    assert checkpoint.latest(tmp_path) is None
    save_steps(ckpt, [2, 10])
    (ckpt / "notes.pt").write_bytes(b"")  # not a step file
    assert checkpoint.latest(tmp_path) == ckpt / "step_10.pt"
    checkpoint.link_atomic(ckpt / "step_2.pt", ckpt / "last.pt")
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
