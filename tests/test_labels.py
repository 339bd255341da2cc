"""Multi-label annotation files (CSV or JSON per split): what they give, and every refusal as one
DataError line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer.data.labels import LabelledSplits, MultiLabelImages, read_label_files
from trainer.errors import DataError

TRAIN = {"a.jpg": "cat outdoor", "sub/b.png": "dog", "c.jpg": "dog cat"}
VAL = {"d.jpg": "bird", "sub/e.png": "cat"}


def write_images(root: Path, paths: list[str]) -> None:
    for i, path in enumerate(paths):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L" if i % 2 else "RGB", (6, 4), color=40 * i).save(root / path)  # L: converted to RGB


def write_csv(file: Path, rows: dict[str, str], header: str = "path,labels") -> None:
    file.write_text("\n".join([header, *(f"{path},{labels}" for path, labels in rows.items())]) + "\n")


def write_json(file: Path, rows: dict[str, str]) -> None:
    file.write_text(json.dumps({path: labels.split() for path, labels in rows.items()}))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Images for TRAIN and VAL (and a spare), labelled by CSV files."""
    root = tmp_path / "data"
    write_images(root, [*TRAIN, *VAL, "spare.jpg"])
    write_csv(root / "train.csv", TRAIN)
    write_csv(root / "val.csv", VAL)
    return root


def refused(root: Path, match: str) -> None:
    """read_label_files refuses in one line that matches ``match``."""
    with pytest.raises(DataError, match=match) as caught:
        read_label_files(root)
    assert "\n" not in str(caught.value)


EXPECTED = LabelledSplits(classes=["bird", "cat", "dog", "outdoor"],
                          train=[("a.jpg", [1, 3]), ("sub/b.png", [2]), ("c.jpg", [1, 2])],
                          val=[("d.jpg", [0]), ("sub/e.png", [1])])


def test_csv_classes_are_the_sorted_union_of_both_splits(root: Path) -> None:
    assert read_label_files(root) == EXPECTED  # "bird" is only in val, "outdoor" only in train


def test_csv_extra_columns_any_order_and_a_spreadsheet_bom(root: Path) -> None:
    (root / "train.csv").write_text('\ufeffid,labels,path\n1,cat  outdoor cat,a.jpg\n2,"dog",sub/b.png\n'
                                    "3,dog cat,./c.jpg\n")
    assert read_label_files(root) == EXPECTED  # repeated and extra spaces, quotes, "./" are all fine


def test_json_and_csv_may_be_mixed_across_splits(root: Path) -> None:
    (root / "train.csv").unlink()
    write_json(root / "train.json", TRAIN)
    assert read_label_files(root) == EXPECTED


def test_images_are_rgb_with_multi_hot_targets(root: Path) -> None:
    splits = read_label_files(root)
    dataset = MultiLabelImages(root, splits.train, len(splits.classes))
    assert len(dataset) == 3
    for i, expected in enumerate([[0, 1, 0, 1], [0, 0, 1, 0], [0, 1, 1, 0]]):
        image, target = dataset[i]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (6, 4)
        assert target.dtype == torch.float32 and target.tolist() == expected
    assert dataset[1][0].getpixel((0, 0)) == (40, 40, 40)  # the grayscale image, as RGB


def test_no_label_file_for_a_split(root: Path) -> None:
    (root / "val.csv").unlink()
    refused(root, r"^data.root=.*data has no val.csv or val.json: with task.name=multilabel put val.csv there "
                  r"\(header path,labels; labels are names separated by spaces\) or val.json \(\{")


def test_both_csv_and_json_for_a_split_is_ambiguous(root: Path) -> None:
    write_json(root / "train.json", TRAIN)
    refused(root, "has both train.csv and train.json; keep only one")


@pytest.mark.parametrize("header, missing", [("path,label", "labels"), ("file,labels", "path"),
                                             ("name,tags", "path or labels")])
def test_missing_column_is_named(root: Path, header: str, missing: str) -> None:
    write_csv(root / "val.csv", VAL, header=header)
    refused(root, rf"val.csv: the header has no {missing} column")


def test_empty_labels_name_the_file_and_line(root: Path) -> None:
    write_csv(root / "train.csv", {**TRAIN, "spare.jpg": "  "})
    refused(root, r"train.csv, line 5: 'spare.jpg' has no labels; give it at least one label name$")
    (root / "train.csv").write_text("path,labels\na.jpg,cat\nspare.jpg\n")  # a short row
    refused(root, r"train.csv, line 3: 'spare.jpg' has no labels")


def test_comma_separated_labels_are_not_silently_cut(root: Path) -> None:
    (root / "val.csv").write_text("path,labels\nd.jpg,bird\nsub/e.png,cat,dog\n")
    refused(root, r"val.csv, line 3 has more fields than the header; separate label names with spaces, not commas$")


def test_empty_labels_in_json(root: Path) -> None:
    (root / "val.csv").unlink()
    (root / "val.json").write_text('{"d.jpg": ["bird"], "sub/e.png": []}')
    refused(root, r"val.json, entry 'sub/e.png': 'sub/e.png' has no labels")


def test_path_that_is_not_a_file(root: Path) -> None:
    write_csv(root / "val.csv", {**VAL, "missing.jpg": "cat"})
    refused(root, r"val.csv, line 4: 'missing.jpg' is not a file under data.root=")
    write_csv(root / "val.csv", {"sub": "cat"})  # a folder
    refused(root, "'sub' is not a file")


@pytest.mark.parametrize("path", ["/etc/hostname", "../data/a.jpg", "sub/../a.jpg"])
def test_absolute_or_escaping_paths(root: Path, path: str) -> None:
    write_csv(root / "val.csv", {path: "cat"})
    refused(root, r"val.csv, line 2: path .* must be relative to data.root, without '..'")


def test_a_path_listed_twice_in_one_split(root: Path) -> None:
    (root / "train.csv").write_text("path,labels\na.jpg,cat\nc.jpg,dog\n./a.jpg,outdoor\n")
    refused(root, r"train.csv, line 4: './a.jpg' is listed twice \(also at .*train.csv, line 2\)")
    (root / "train.csv").unlink()
    (root / "train.json").write_text('{"a.jpg": ["cat"], "a.jpg": ["dog"]}')  # json.loads would keep one
    refused(root, r"train.json, entry 'a.jpg': 'a.jpg' is listed twice")


def test_a_path_in_both_splits(root: Path) -> None:
    write_csv(root / "val.csv", {**VAL, "c.jpg": "dog"})
    refused(root, r"val.csv, line 4: 'c.jpg' is also in the train split \(.*train.csv, line 4\)")


@pytest.mark.parametrize("text, problem", [
    ("[]", "holds a JSON list, not an object"),
    ('"a.jpg"', "holds a JSON str, not an object"),
    ('{"d.jpg": "bird"}', "entry 'd.jpg': labels must be a list of label names"),
    ('{"d.jpg": ["bird", 3]}', "entry 'd.jpg': labels must be a list of label names"),
    ('{"d.jpg": ["two words"]}', "entry 'd.jpg': labels must be a list of label names"),
    ('{"d.jpg": [""]}', "entry 'd.jpg': labels must be a list of label names"),
    ('{"d.jpg": {"bird": 1}}', "entry 'd.jpg': labels must be a list of label names"),
    ('{"d.jpg": ["bird"]', r"is not a readable JSON file \(Expecting"),
    (b"\xff\xfe{}", r"is not a readable JSON file \(.*codec can't decode"),
])
def test_invalid_json(root: Path, text: str | bytes, problem: str) -> None:
    (root / "val.csv").unlink()
    file = root / "val.json"
    file.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(root, rf"val.json,? {problem}")


@pytest.mark.parametrize("content, problem", [
    (b'path,labels\n"a.jpg"x,cat\n', r"is not a readable CSV file \(',' expected after '\"'\)"),
    (b"path,labels\nd.jpg,\xe9t\xe9\n", r"is not a readable CSV file \('utf-8' codec can't decode byte .*\)"),
])
def test_invalid_csv(root: Path, content: bytes, problem: str) -> None:
    (root / "val.csv").write_bytes(content)
    refused(root, rf"val.csv {problem}; write it as UTF-8 with a path,labels header")


@pytest.mark.parametrize("name, text", [("val.csv", "path,labels\n"), ("val.json", "{}")])
def test_an_empty_split(root: Path, name: str, text: str) -> None:
    (root / "val.csv").unlink()
    (root / name).write_text(text)
    refused(root, rf"{name} lists no images; add at least one")
