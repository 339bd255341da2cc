"""``python -m trainer.prepare`` and ``data.source=prepared``: a folder of mixed images (RGB and
CMYK JPEGs, grayscale, RGBA and palette PNGs, larger and smaller than the short side) round-trips
into webdataset shards, deterministically; a run trains from them and resumes on another world
size serving every sample once; a damaged shard is refused in one line, exit 2."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import last_checkpoint, run, small_run
from PIL import Image
from refusals import error_line
from test_resume import EPOCHS, recorded, recorded_run
from torch.utils.data import DataLoader

from trainer.data import decode, loaders, shards
from trainer.errors import DataError
from trainer.tools import prepare

SHORT_SIDE = 24
CLASSES = ("cat", "dog", "eel")
TRAIN_PER_CLASS, VAL_PER_CLASS = 16, 4
MODES = ("RGB", "CMYK", "L", "RGBA", "P")
"""Cycled over the images: CMYK and RGB as JPEG, the others as PNG."""


def image_folder(root: Path, train_per_class: int = TRAIN_PER_CLASS, val_per_class: int = VAL_PER_CLASS,
                 seed: int = 0) -> dict[str, tuple[int, int]]:
    """``root/{train,val}/<class>/*``: noise images of varied sizes (a third smaller than
    :data:`SHORT_SIDE`) and modes; their sizes by path relative to ``root``."""
    rng = np.random.default_rng(seed)
    sizes = {}
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                short = int(rng.integers(8, SHORT_SIDE)) if i % 3 == 0 else int(rng.integers(SHORT_SIDE, 80))
                long = short + int(rng.integers(0, 40))
                size = (long, short) if i % 2 else (short, long)
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                mode = MODES[i % len(MODES)]
                image = Image.fromarray(pixels).convert(mode)
                suffix = ".jpg" if mode in ("RGB", "CMYK") else ".png"
                image.save(folder / f"{i:03d}{suffix}")
                sizes[f"{split}/{name}/{i:03d}{suffix}"] = size
    return sizes


def options(tmp: Path, **changes) -> prepare.Options:
    """A shard of about 24 KiB: several shards per split."""
    return prepare.Options(**{"short_side": SHORT_SIDE, "shard_bytes": 24 * 1024, "workers": 2,
                              "cache_dir": str(tmp / "cache"), **changes})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, tuple[int, int]]]:
    """(source, prepared folder, source sizes)."""
    tmp = tmp_path_factory.mktemp("prepare")
    sizes = image_folder(tmp / "src")
    assert prepare.prepare(tmp / "src", tmp / "dst", options(tmp), say=lambda line: None)
    return tmp / "src", tmp / "dst", sizes


def members(folder: Path, split: str) -> dict[str, bytes]:
    """Every member of a split's shards, by name, read with tarfile (as webdataset would)."""
    found = {}
    for path in sorted(folder.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                found[info.name] = tar.extractfile(info).read()
    return found


def test_round_trip_keeps_classes_and_counts_and_bounds_every_short_side(prepared) -> None:
    src, dst, sizes = prepared
    manifest = shards.read_manifest(dst)
    assert manifest.classes == list(CLASSES) and manifest.short_side == SHORT_SIDE
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        dataset = shards.PreparedImages(manifest, split)
        assert manifest.counts[split] == [per_class] * len(CLASSES)
        assert len(dataset.shards) >= 2 and len(dataset) == per_class * len(CLASSES)
        originals = sorted(path for path in sizes if path.startswith(split))  # the scan's order: class, then name
        found = members(dst, split)
        assert len(found) == 2 * len(dataset)  # <key>.jpg and <key>.cls: webdataset's layout
        for index, relative in enumerate(originals):
            image, target = dataset[index]
            assert image.format == "JPEG" and target == CLASSES.index(relative.split("/")[1])
            assert found[f"{shards.key(index)}.cls"] == str(target).encode()
            assert found[f"{shards.key(index)}.jpg"] == dataset.read(index)
            image.load()
            assert image.mode == "RGB"
            width, height = sizes[relative]
            if min(width, height) <= SHORT_SIDE:  # never enlarged
                assert image.size == (width, height), relative
            else:
                assert min(image.size) == SHORT_SIDE and abs(image.size[0] / image.size[1] - width / height) < 0.1


def test_the_same_bytes_with_one_worker_and_the_shard_list_is_wids(prepared, tmp_path: Path) -> None:
    src, dst, _ = prepared
    killed = tmp_path / ".again.tmp.4194999"  # a staging folder whose process is gone (above Linux's pid_max)
    killed.mkdir()
    assert prepare.prepare(src, tmp_path / "again", options(tmp_path, workers=1), say=lambda line: None)
    assert not killed.exists()
    names = sorted(p.name for p in dst.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        if name != shards.MANIFEST:
            assert (dst / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    listed = json.loads((dst / "train.json").read_text())
    assert listed["__kind__"] == "wids-shard-index-v1" and listed["wids_version"] == 1
    assert all((dst / shard["url"]).stat().st_size == shard["filesize"] for shard in listed["shardlist"])


def test_an_existing_destination_is_kept_or_refused_in_one_line(prepared, capsys: pytest.CaptureFixture) -> None:
    src, dst, _ = prepared
    before = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}
    common = [str(src), str(dst), "--shard-size-mb", "1", "--cache-dir", str(dst.parent / "cache")]
    assert prepare.main([*common, "--short-side", str(SHORT_SIDE)]) == 2  # another shard size
    assert prepare.main([*common, "--short-side", "16"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith(f"error: {dst} exists and is not this preparation") for line in err)
    assert "short_side 24 -> 16" in err[1]
    assert not prepare.prepare(src, dst, options(dst.parent), say=lambda line: None)  # the same: nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in dst.iterdir()} == before


def test_an_unreadable_image_leaves_no_destination_or_is_skipped(tmp_path: Path) -> None:
    image_folder(tmp_path / "src", train_per_class=2, val_per_class=1)
    bad = tmp_path / "src" / "train" / "dog" / "001.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"cannot read {bad}: .*--skip-bad"):
        prepare.prepare(tmp_path / "src", tmp_path / "dst", options(tmp_path), say=lambda line: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "src"]  # no DST, no staging folder left
    (tmp_path / "dst").mkdir()  # an empty folder is no preparation: it is replaced
    assert prepare.prepare(tmp_path / "src", tmp_path / "dst", options(tmp_path, skip_bad=True), say=lambda line: None)
    manifest = shards.read_manifest(tmp_path / "dst")
    assert manifest.counts["train"] == [2, 1, 2] and manifest.raw["splits"]["train"]["skipped"] == ["dog/001.jpg"]


def test_training_crops_of_prepared_samples_are_tensor_decoded_within_1_of_pil(prepared) -> None:
    """A prepared sample is a JPEG in memory: its crop is decoded and resized as a uint8 tensor
    (torchvision.io), the same box from the same seed and pixels within 1 of PIL's decode and crop."""
    crop = decode.ResizedCrop(16, (0.08, 1.0), draft=True)
    split = shards.load_splits(prepared[1])[0]
    for index in range(len(split)):
        torch.manual_seed(index)
        from_memory = crop(split[index][0])
        decoded = Image.open(io.BytesIO(split.read(index)))
        decoded.load()  # pixels already there: PIL crops them
        torch.manual_seed(index)
        with_pil = decode.to_uint8_tensor(crop(decoded))
        assert isinstance(from_memory, torch.Tensor) and from_memory.dtype == torch.uint8
        assert (from_memory.int() - with_pil.int()).abs().max() <= 1, index


def test_forked_workers_and_unpickled_copies_open_their_own_files(prepared) -> None:
    _, dst, _ = prepared
    train, _, _ = shards.load_splits(dst)
    expected = [train.read(i) for i in range(len(train))]  # this process holds descriptors now
    copy = pickle.loads(pickle.dumps(train))
    assert copy._files == {} and [copy.read(i) for i in range(len(copy))] == expected
    batches = DataLoader(_Bytes(train), batch_size=None, num_workers=2)
    assert list(batches) == expected


class _Bytes:
    def __init__(self, dataset: shards.PreparedImages) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> bytes:
        return self.dataset.read(index)


def damaged_copy(dst: Path, tmp: Path, change) -> Path:
    copy = tmp / "damaged"
    shutil.copytree(dst, copy)
    change(copy)
    return copy


def _flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x40
    path.write_bytes(bytes(data))


def _first_jpeg_byte(folder: Path) -> int:
    return int(np.load(folder / "train.samples.npy")["offset"][0]) + shards.HEADER + 100


DAMAGE = {
    "cut shard": (lambda d: (d / "train-000000.tar").write_bytes((d / "train-000000.tar").read_bytes()[:5000]),
                  "shard {d}/train-000000.tar has 5000 bytes"),
    "missing shard": (lambda d: (d / "train-000001.tar").unlink(), "shard {d}/train-000001.tar is missing"),
    "flipped image byte": (lambda d: _flip(d / "train-000000.tar", _first_jpeg_byte(d)),
                           "prepared shard {d}/train-000000.tar is damaged: the bytes of 00000000.jpg differ"),
    "flipped header byte": (lambda d: _flip(d / "train-000000.tar", 10),
                            "prepared shard {d}/train-000000.tar is damaged: "),
    "table of another split": (lambda d: shutil.copy(d / "val.samples.npy", d / "train.samples.npy"),
                               "the sample table {d}/train.samples.npy does not match the shards"),
    "no manifest": (lambda d: (d / shards.MANIFEST).unlink(), "has no prepared.json"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_refused_in_one_line_naming_the_file_even_when_skipping_bad_samples(
        prepared, tmp_path: Path, case: str) -> None:
    _, dst, _ = prepared
    change, words = DAMAGE[case]
    copy = damaged_copy(dst, tmp_path, change)
    with pytest.raises(DataError) as refused:
        train, _, _ = shards.load_splits(copy)
        skipping = loaders.SeededTransformDataset(train, lambda image: image, seed=0, skip_bad=True)
        for index in range(len(train)):
            skipping[(0, index)]
    message = str(refused.value)
    assert "\n" not in message and words.format(d=copy) in message, message
    assert message.endswith(shards.again(copy)) or "trainer.prepare SRC" in message


def test_verify_checks_every_digest(prepared, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, dst, _ = prepared
    assert prepare.main(["--verify", str(dst)]) == 0
    assert "every SHA-256 and sample checked" in capsys.readouterr().out
    listed = json.loads((dst / "val.json").read_text())
    copy = damaged_copy(dst, tmp_path, lambda d: _flip(d / listed["shardlist"][0]["url"], -100))  # in the padding
    assert len(shards.load_splits(copy)[1]) == len(CLASSES) * VAL_PER_CLASS  # opening does not hash
    assert prepare.main(["--verify", str(copy)]) == 2
    assert capsys.readouterr().err.startswith(f"error: prepared shard {copy}/val-000000.tar is damaged: its SHA-256")


@pytest.mark.slow
def test_training_resumes_on_another_world_size_serving_each_prepared_sample_once(prepared, tmp_path: Path) -> None:
    """Stopped mid-epoch on 2 processes, resumed on 1 with half the batch: every epoch serves each
    of the prepared training samples exactly once (tests/recording_worker.py records them)."""
    _, dst, _ = prepared
    size = TRAIN_PER_CLASS * len(CLASSES)
    source = ("data.source=prepared", f"data.root={dst}", "data.random_resized_crop=true")
    stopped = recorded_run(tmp_path, "prepared", *source, STOP_AT_STEP="5")
    assert stopped.returncode != 0 and "checkpoint saved, exit code 3" in stopped.stdout + stopped.stderr
    assert last_checkpoint(tmp_path, "prepared")["position"]["consumed"] > 0
    resumed = recorded_run(tmp_path, "prepared", *source, nproc=1, batch_size=4)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "world size 2 -> 1" in resumed.stdout
    served = Counter((s["epoch"], s["index"]) for s in recorded(tmp_path, "prepared", "served") if s["size"] == size)
    for epoch in range(EPOCHS):
        assert sorted(i for (e, i), n in served.items() if e == epoch for _ in range(n)) == list(range(size)), epoch
    final = last_checkpoint(tmp_path, "prepared")
    assert final["classes"] == list(CLASSES) and len(final["history"]) == EPOCHS
    assert all(record["train/samples"] == size for record in final["history"])


def test_a_damaged_shard_stops_training_with_one_line_and_exit_2(prepared, tmp_path: Path) -> None:
    """Read by forked loader workers, with data.on_bad_sample=skip: still refused."""
    _, dst, _ = prepared
    copy = damaged_copy(dst, tmp_path, DAMAGE["flipped image byte"][0])
    result = run(small_run(tmp_path, "data.source=prepared", f"data.root={copy}", "data.num_workers=2",
                           "data.on_bad_sample=skip", "train.epochs=1", "log.pictures=false"))
    assert result.returncode == 2, result.stdout + result.stderr
    line = error_line(result)
    assert line.startswith(f"error: prepared shard {copy}/train-000000.tar is damaged: the bytes of 00000000.jpg")
    assert "python -m trainer.prepare SRC" in line
