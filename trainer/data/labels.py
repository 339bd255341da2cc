"""Multi-label annotations for a folder of images: ``train`` and ``val`` label files under the data
root, each either a CSV (columns ``path`` and ``labels``, label names separated by spaces; other
columns ignored) or a JSON object (``{"relative/path.jpg": ["label", ...]}``).

A mistake in these files is refused up front, in one line naming the file, rather than surfacing
mid-epoch in a loader worker or as a silently wrong target. The class list is the sorted union of
the names in both splits, so it does not depend on the order of the rows.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from PIL import Image
from torch.utils.data import Dataset

from trainer.errors import DataError

SPLITS = ("train", "val")

Row = tuple[str, str, list[str]]
"""Where it was read (file and line or entry, for messages), its path, its label names."""


@dataclass
class LabelledSplits:
    """The class names and each split's ``(relative path, sorted class indices)`` samples."""

    classes: list[str]
    train: list[tuple[str, list[int]]]
    val: list[tuple[str, list[int]]]


def read_label_files(root: Path) -> LabelledSplits:
    """Read and check ``root/{train,val}.{csv,json}``: every image exists, none is listed twice."""
    train, val = (_checked(root, _label_file(root, split)) for split in SPLITS)
    in_train = {path: where for where, path, _ in train}
    for where, path, _ in val:
        if path in in_train:
            raise DataError(f"{where}: {path!r} is also in the train split ({in_train[path]}); "
                            "keep each image in one split only")
    classes = sorted({name for _, _, names in train + val for name in names})
    index = {name: i for i, name in enumerate(classes)}

    def indexed(rows: list[Row]) -> list[tuple[str, list[int]]]:
        return [(path, sorted({index[name] for name in names})) for _, path, names in rows]

    return LabelledSplits(classes, indexed(train), indexed(val))


class MultiLabelImages(Dataset):
    """(PIL RGB image, multi-hot float32 tensor of len(classes)) per sample.

    Decodes in full, as torchvision's default loader does; the caller adds its own transform.
    """

    def __init__(self, root: Path, samples: list[tuple[str, list[int]]], num_classes: int) -> None:
        self.root, self.samples, self.num_classes = Path(root), samples, num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def sample_path(self, index: int) -> str:
        """The file behind sample ``index`` (for error messages)."""
        return str(self.root / self.samples[index][0])

    def __getitem__(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        path, classes = self.samples[index]
        with Image.open(self.root / path) as image:  # closes the file once decoded
            rgb = image.convert("RGB")
        target = torch.zeros(self.num_classes, dtype=torch.float32)
        target[torch.tensor(classes, dtype=torch.long)] = 1.0
        return rgb, target


def _label_file(root: Path, split: str) -> Path:
    found = [path for path in (root / f"{split}.csv", root / f"{split}.json") if path.is_file()]
    if not found:
        raise DataError(f"data.root={root} has no {split}.csv or {split}.json: with task.name=multilabel "
                        f"put {split}.csv there (header path,labels; labels are names separated by spaces) "
                        f"or {split}.json ({{\"relative/path.jpg\": [\"label\", ...]}})")
    if len(found) > 1:
        raise DataError(f"data.root={root} has both {split}.csv and {split}.json; "
                        "keep only one so that it is clear which labels count")
    return found[0]


def _checked(root: Path, file: Path) -> list[Row]:
    """The file's rows with normalised paths, refusing empty labels, bad or repeated paths."""
    rows = _read_csv(file) if file.suffix == ".csv" else _read_json(file)
    if not rows:
        raise DataError(f"{file} lists no images; add at least one")
    checked: dict[str, Row] = {}
    for where, path, names in rows:
        relative = PurePosixPath(path)
        key = relative.as_posix()  # "./a.jpg" and "a.jpg" are one image
        if not names:
            raise DataError(f"{where}: {path!r} has no labels; give it at least one label name")
        if relative.is_absolute() or ".." in relative.parts:
            raise DataError(f"{where}: path {path!r} must be relative to data.root, without '..'")
        if key in checked:
            raise DataError(f"{where}: {path!r} is listed twice (also at {checked[key][0]}); "
                            "give each image one entry with all its labels")
        if not (root / relative).is_file():
            raise DataError(f"{where}: {path!r} is not a file under data.root={root}; fix the path or the root")
        checked[key] = (where, key, names)
    return list(checked.values())


def _read_csv(file: Path) -> list[Row]:
    try:
        with file.open(newline="", encoding="utf-8-sig") as stream:  # -sig: a spreadsheet's BOM
            reader = csv.DictReader(stream, strict=True)
            missing = [c for c in ("path", "labels") if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{file}: the header has no {' or '.join(missing)} column; "
                                "its first line must name the columns path,labels")
            rows: list[Row] = []
            for row in reader:
                where = f"{file}, line {reader.line_num}"
                if None in row:  # DictReader's key for the fields past the header's
                    raise DataError(f"{where} has more fields than the header; "
                                    "separate label names with spaces, not commas")
                rows.append((where, row["path"] or "", (row["labels"] or "").split()))
            return rows
    except (OSError, UnicodeError, csv.Error) as exc:
        raise DataError(f"{file} is not a readable CSV file ({' '.join(str(exc).split())}); "
                        "write it as UTF-8 with a path,labels header") from None


class _Pairs(list):
    """A JSON object kept as its (key, value) pairs, so that a repeated path is seen, not dropped."""


def _read_json(file: Path) -> list[Row]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"), object_pairs_hook=_Pairs)
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, [[[[...
        raise DataError(f"{file} is not a readable JSON file ({' '.join(str(exc).split())}); "
                        "write it as UTF-8 JSON") from None
    if not isinstance(data, _Pairs):
        raise DataError(f"{file} holds a JSON {type(data).__name__}, not an object; "
                        "write {\"relative/path.jpg\": [\"label\", ...], ...}")
    for path, names in data:
        if type(names) is not list or not all(isinstance(n, str) and n.split() == [n] for n in names):
            raise DataError(f"{file}, entry {path!r}: labels must be a list of label names "
                            "(strings without spaces), e.g. [\"cat\", \"outdoor\"]")
    return [(f"{file}, entry {path!r}", path, names) for path, names in data]
