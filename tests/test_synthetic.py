"""The built-in shapes data set: layout, determinism, caching, concurrency and validation."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data import synthetic
from trainer.data.synthetic import SHAPES, SyntheticSpec, ensure_synthetic_dataset

SMALL = SyntheticSpec(num_classes=3, train_per_class=4, val_per_class=2, image_size=16)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _images(root: Path) -> dict[str, bytes]:
    return {name: data for name, data in _files(root).items() if name.endswith(".png")}


def _assert_valid_tree(root: Path, spec: SyntheticSpec) -> None:
    assert json.loads((root / "DONE.json").read_text())["spec"]["seed"] == spec.seed
    assert sorted(p.name for p in root.iterdir()) == ["DONE.json", "train", "val"]
    for split, count in (("train", spec.train_per_class), ("val", spec.val_per_class)):
        folders = sorted(p.name for p in (root / split).iterdir())
        assert folders == sorted(SHAPES[: spec.num_classes])
        for shape in folders:
            assert len(list((root / split / shape).glob("*.png"))) == count, (split, shape)


def _race(barrier, results, cache_dir: str, spec: SyntheticSpec) -> None:
    """A spawned process: wait for the others, then ask for the data set at the same moment."""
    barrier.wait(timeout=60)
    results.put(str(ensure_synthetic_dataset(cache_dir, spec)))


def test_shapes_are_unique_and_enough() -> None:
    assert len(SHAPES) >= 8
    assert len(set(SHAPES)) == len(SHAPES)


@pytest.mark.parametrize("num_classes,image_size", [(2, 16), (len(SHAPES), 24)])
def test_layout_counts_and_images(tmp_path: Path, num_classes: int, image_size: int) -> None:
    spec = SyntheticSpec(num_classes=num_classes, train_per_class=3, val_per_class=2,
                         image_size=image_size)
    root = ensure_synthetic_dataset(tmp_path, spec)

    assert root.parent == tmp_path
    _assert_valid_tree(root, spec)
    assert {p.name for p in (root / "train").iterdir()} == set(SHAPES[:num_classes])
    for path in root.rglob("*.png"):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.size == (image_size, image_size)
            pixels = np.asarray(image, dtype=np.float32)
        # A shape on a contrasting background, not a flat or pure-noise image: after averaging
        # 2x2 blocks (which halves the noise) some channel still spans a wide range.
        blocks = pixels.reshape(image_size // 2, 2, image_size // 2, 2, 3).mean(axis=(1, 3))
        assert np.ptp(blocks, axis=(0, 1)).max() > 70, path


def test_directory_name_encodes_the_spec(tmp_path: Path) -> None:
    root = ensure_synthetic_dataset(tmp_path, SMALL)
    other = ensure_synthetic_dataset(tmp_path, dataclasses.replace(SMALL, seed=1))
    assert root.name == "shapes-c3-n4-v2-s16-seed0"
    assert other.name == "shapes-c3-n4-v2-s16-seed1"
    _assert_valid_tree(root, SMALL)  # the second spec did not disturb the first


def test_same_spec_gives_identical_bytes(tmp_path: Path) -> None:
    first = _files(ensure_synthetic_dataset(tmp_path / "a", SMALL))
    second = _files(ensure_synthetic_dataset(tmp_path / "b", SMALL))
    assert len(first) == 3 * (4 + 2) + 1
    assert first == second


def test_other_seed_gives_other_images(tmp_path: Path) -> None:
    base = _images(ensure_synthetic_dataset(tmp_path, SMALL))
    other = _images(ensure_synthetic_dataset(tmp_path, dataclasses.replace(SMALL, seed=7)))
    assert base.keys() == other.keys()
    assert all(base[name] != other[name] for name in base)


def test_images_are_all_different(tmp_path: Path) -> None:
    images = _images(ensure_synthetic_dataset(tmp_path, SMALL))
    assert len(set(images.values())) == len(images)  # in particular no val image is in train


def test_global_random_generators_are_untouched(tmp_path: Path) -> None:
    random.seed(123)
    np.random.seed(123)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    ensure_synthetic_dataset(tmp_path, SMALL)
    assert random.getstate() == python_state
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1])
    assert after[2:] == numpy_state[2:]


def test_second_call_reuses_the_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = ensure_synthetic_dataset(tmp_path, SMALL)
    before = {p: p.stat().st_mtime_ns for p in [root, *root.rglob("*")]}

    def must_not_write(*args: object) -> None:
        raise AssertionError("a complete tree was generated again")

    monkeypatch.setattr(synthetic, "_write_tree", must_not_write)
    assert ensure_synthetic_dataset(str(tmp_path), SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in [root, *root.rglob("*")]} == before
    assert list(tmp_path.iterdir()) == [root]


def test_tree_finished_by_another_process_first_wins(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = synthetic._write_tree
    rival: dict[Path, int] = {}

    def write_after_a_rival(tmp: Path, spec: SyntheticSpec) -> None:
        monkeypatch.setattr(synthetic, "_write_tree", real_write)
        winner = ensure_synthetic_dataset(tmp_path, spec)  # "another process" finishes first
        rival.update({p: p.stat().st_mtime_ns for p in [winner, *winner.rglob("*")]})
        real_write(tmp, spec)

    monkeypatch.setattr(synthetic, "_write_tree", write_after_a_rival)
    root = ensure_synthetic_dataset(tmp_path, SMALL)
    assert {p: p.stat().st_mtime_ns for p in [root, *root.rglob("*")]} == rival  # kept as it was
    assert list(tmp_path.iterdir()) == [root]  # the loser's copy was discarded
    _assert_valid_tree(root, SMALL)


def test_concurrent_processes_share_one_tree(tmp_path: Path) -> None:
    spec = SyntheticSpec(num_classes=3, train_per_class=30, val_per_class=5, image_size=16)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    workers = [ctx.Process(target=_race, args=(barrier, results, str(tmp_path), spec))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    paths = {results.get(timeout=120) for _ in workers}
    for worker in workers:
        worker.join(timeout=30)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]

    root = tmp_path / "shapes-c3-n30-v5-s16-seed0"
    assert paths == {str(root)}
    assert list(tmp_path.iterdir()) == [root]  # no temporary or trash directories left
    _assert_valid_tree(root, spec)
    assert _files(root) == _files(ensure_synthetic_dataset(tmp_path / "reference", spec))


@pytest.mark.parametrize("damage", ["no marker", "marker of another spec", "empty directory"])
def test_incomplete_tree_is_regenerated(tmp_path: Path, damage: str) -> None:
    reference = _files(ensure_synthetic_dataset(tmp_path / "reference", SMALL))
    cache = tmp_path / "cache"
    root = ensure_synthetic_dataset(cache, SMALL)
    if damage == "empty directory":
        for path in sorted(root.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
    else:
        next(root.rglob("*.png")).write_bytes(b"truncated")
        (root / "train" / "stray.txt").write_text("left over by an interrupted run")
        marker = root / "DONE.json"
        if damage == "no marker":
            marker.unlink()
        else:
            marker.write_text(json.dumps({"format": 1, "spec": {**dataclasses.asdict(SMALL), "seed": 9}}))

    assert ensure_synthetic_dataset(cache, SMALL) == root
    assert _files(root) == reference
    assert list(cache.iterdir()) == [root]


def test_failed_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_render = synthetic._render
    calls = 0

    def failing_render(*args: object) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls > 5:
            raise OSError("disk full")
        return real_render(*args)

    monkeypatch.setattr(synthetic, "_render", failing_render)
    with pytest.raises(OSError, match="disk full"):
        ensure_synthetic_dataset(tmp_path, SMALL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "_render", real_render)
    _assert_valid_tree(ensure_synthetic_dataset(tmp_path, SMALL), SMALL)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_classes", 1, "num_classes must be between 2 and"),
        ("num_classes", len(SHAPES) + 1, f"there are {len(SHAPES)} shapes"),
        ("train_per_class", 0, "train_per_class must be >= 1"),
        ("val_per_class", -3, "val_per_class must be >= 1"),
        ("image_size", 8, "image_size must be >= 16"),
        ("seed", -1, "seed must be >= 0"),
        ("image_size", 32.0, "image_size must be an integer"),
        ("num_classes", True, "num_classes must be an integer"),
    ],
)
def test_invalid_spec_is_rejected(tmp_path: Path, field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        ensure_synthetic_dataset(tmp_path / "cache", SyntheticSpec(**{field: value}))
    assert "\n" not in str(error.value)
    assert repr(value) in str(error.value) or str(value) in str(error.value)
    assert not (tmp_path / "cache").exists()  # rejected before anything is written
