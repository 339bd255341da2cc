"""The ImageFolder index: same samples as torchvision's ImageFolder, scanned once per version of the
tree, hidden files skipped; downloads staged then renamed. (Two ranks sharing one scan: see
test_bad_batches.py, whose two-rank run checks it; bench.scale --quick checks a cached start.)"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import logging
import os
import re
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch
from PIL import Image
from test_data import data_cfg, write_image_folder
from torchvision import datasets
from torchvision_files import write_mnist

from trainer.data import image_index, loaders, sources
from trainer.errors import DataError

SCANNED = "indexed "


def scans(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The scan log lines so far (one per split walked), then forget them."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(SCANNED)]
    caplog.clear()
    return lines


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    write_image_folder(root, {"train": ["cat", "dog"], "val": ["cat", "dog"]}, per_class=3)
    return root


def open_folder(root: Path, cache: Path) -> sources.Splits:
    return sources.load_splits(data_cfg(source="imagefolder", root=root, cache_dir=cache))


def test_same_samples_and_classes_as_torchvision_image_folder(tree: Path, tmp_path: Path) -> None:
    nested = tree / "train" / "dog" / "more" / "deeper"
    nested.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(nested / "x.jpg")
    Image.new("RGB", (8, 8)).save(tree / "train" / "dog" / "more" / "a.png")
    (tree / "train" / "cat" / "notes.txt").write_text("not an image")
    mine = open_folder(tree, tmp_path / "cache").train
    theirs = datasets.ImageFolder(str(tree / "train"))
    assert mine.classes == theirs.classes and mine.class_to_idx == theirs.class_to_idx
    assert [(mine.sample_path(i), int(mine.targets[i])) for i in range(len(mine))] == theirs.samples
    image, target = mine[len(mine) - 1]
    assert (image.mode, target) == ("RGB", theirs.samples[-1][1])


def test_index_is_reused_then_invalidated_by_a_new_file(tree: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=image_index.__name__)
    cache = tmp_path / "cache"
    assert len(open_folder(tree, cache).train) == 6 and len(scans(caplog)) == 2  # train and val walked
    written = {path: path.stat().st_mtime_ns for path in (cache / "image-index").glob("*.npz")}
    assert len(written) == 2
    assert len(open_folder(tree, cache).train) == 6 and not scans(caplog)  # read back, no walk
    assert {path: path.stat().st_mtime_ns for path in (cache / "image-index").glob("*.npz")} == written
    Image.new("RGB", (8, 8)).save(tree / "train" / "cat" / "new.png")
    splits = open_folder(tree, cache)
    assert str(tree / "train" / "cat" / "new.png") in map(splits.train.sample_path, range(len(splits.train)))
    assert len(splits.train) == 7 and [f"under {tree / 'train'} " in line for line in scans(caplog)] == [True]
    assert len(list((cache / "image-index").glob("*.npz"))) == 2  # the outdated train index was replaced


def test_new_file_in_a_nested_folder_invalidates(tree: Path, tmp_path: Path) -> None:
    nested = tree / "train" / "cat" / "batch1"
    nested.mkdir()
    Image.new("RGB", (8, 8)).save(nested / "a.png")
    assert len(open_folder(tree, tmp_path / "cache").train) == 7
    Image.new("RGB", (8, 8)).save(nested / "b.png")  # changes batch1's time only, not cat's
    assert len(open_folder(tree, tmp_path / "cache").train) == 8


def test_hidden_files_and_folders_are_skipped_and_counted(tree: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=image_index.__name__)
    (tree / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not a PNG")
    (tree / "train" / "cat" / ".DS_Store").write_bytes(b"Bud1")
    (tree / "train" / ".ipynb_checkpoints").mkdir()  # would be a class for ImageFolder
    hidden_dir = tree / "train" / "dog" / ".thumbnails"
    hidden_dir.mkdir()
    Image.new("RGB", (8, 8)).save(hidden_dir / "t.png")
    train = open_folder(tree, tmp_path / "cache").train
    assert train.classes == ["cat", "dog"] and len(train) == 6
    assert not any("/." in train.sample_path(i) for i in range(len(train)))
    (line,) = [s for s in scans(caplog) if str(tree / "train") + " " in s]
    assert "skipped 4 hidden files and folders" in line


def test_a_damaged_index_file_is_rescanned(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    open_folder(tree, cache)
    for index_file in (cache / "image-index").glob("*.npz"):
        index_file.write_bytes(index_file.read_bytes()[:50])
    assert len(open_folder(tree, cache).val) == 6


def test_class_without_images_keeps_image_folders_message(tree: Path, tmp_path: Path) -> None:
    (tree / "val" / "dog" / "empty").mkdir()
    for image in (tree / "val" / "dog").glob("*.png"):
        image.unlink()
    with pytest.raises(DataError, match=r"/val: Found no valid file for the classes dog\. Supported extensions"):
        open_folder(tree, tmp_path / "cache")


def test_validation_workers_are_not_persistent(tree: Path, tmp_path: Path) -> None:
    cfg = data_cfg(source="imagefolder", root=tree, cache_dir=tmp_path, num_workers=1, persistent_workers=True)
    splits = sources.load_splits(cfg)
    val = loaders.build_val_loader(splits.val, cfg, 1, 0, torch.device("cpu"), seed=0)
    batches = loaders.TrainBatchSampler(len(splits.train), 1, 0, 2, 0)
    train = loaders.build_train_loader(loaders.SeededTransformDataset(splits.train, lambda x: x, 0), batches, cfg,
                                    torch.device("cpu"), seed=0)
    assert train.persistent_workers and not val.persistent_workers


# -------------------------------------------------------------------------------------- downloads

class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mnist_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A local HTTP mirror serving gzipped MNIST stand-ins; torchvision's MNIST points at it."""
    served = tmp_path / "mirror"
    write_mnist(tmp_path / "written", train_size=4, test_size=2)
    served.mkdir()
    resources = []
    for raw in sorted((tmp_path / "written" / "MNIST" / "raw").iterdir()):
        packed = gzip.compress(raw.read_bytes(), mtime=0)
        (served / f"{raw.name}.gz").write_bytes(packed)
        resources.append((f"{raw.name}.gz", hashlib.md5(packed).hexdigest()))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Files(*a, directory=str(served)))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setattr(datasets.MNIST, "mirrors", [f"http://127.0.0.1:{server.server_address[1]}/"])
    monkeypatch.setattr(datasets.MNIST, "resources", resources)
    yield served
    server.shutdown()
    server.server_close()


def test_download_is_staged_then_renamed(mnist_mirror: Path, tmp_path: Path) -> None:
    root = tmp_path / "sets"
    cfg = data_cfg(source="mnist", root=root, download=True)
    sources.prepare(cfg)
    assert sorted(os.listdir(root)) == ["MNIST"]  # no staging folder left behind
    splits = sources.load_splits(cfg)
    assert (len(splits.train), len(splits.val)) == (4, 2)


def test_failed_download_leaves_no_half_set(mnist_mirror: Path, tmp_path: Path) -> None:
    test_images = next(mnist_mirror.glob("t10k-images*"))
    test_images.write_bytes(test_images.read_bytes()[:10])  # the last file arrives damaged (md5 differs)
    root = tmp_path / "sets"
    with pytest.raises(DataError, match=f"MNIST.*{re.escape(str(root))}'"):
        sources.prepare(data_cfg(source="mnist", root=root, download=True))
    assert os.listdir(root) == []  # the files that did arrive are not where MNIST looks


def test_rank_without_the_downloaded_set_says_why(tmp_path: Path) -> None:
    """Another node's rank, after rank 0 downloaded into its own node-local data.root."""
    with pytest.raises(DataError, match="data.root must be a folder every node sees"):
        sources.load_splits(data_cfg(source="mnist", root=tmp_path, download=True))
