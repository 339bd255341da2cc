"""Every file the project reads, fuzzed: damaged bytes (cuts at any offset, flipped bits, spans
overwritten, removed or repeated, random bytes) and valid containers with wrong contents.

Each case either loads (damage in bytes nothing checks: a weights payload, a YAML value) or
raises our one-line error naming the file; never another exception, never a hang, and no file the
reader was pointed at is modified or removed (tests/fuzzing.py). Our checkpoints load with
exactly their saved contents or not at all (the digest). A fixed seed per test; ``FUZZ_SCALE``
multiplies the cases (``make fuzz``); the 606-case checkpoint mix of issue 28 is a plain test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from fuzzing import check_reader, damaged, fuzz_settings, text_lines
from helpers import REPO
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image
from refusals import error_line, snapshot, snapshot_diff, trainer_env

from trainer import checkpoint, config
from trainer.checkpoint import digest, runlock
from trainer.config.cli import parse_command_line
from trainer.data import image_index, labels, loaders, shards
from trainer.errors import CheckpointError, ConfigError, DataError, UserError
from trainer.models import build_model
from trainer.models.weights import checkpoint_data_settings, load_weights, read_weight_file
from trainer.tools import export, predict, prepare, report

SMALL_RUN = ["data.synthetic_classes=3", "data.synthetic_train_per_class=8", "data.synthetic_val_per_class=2",
             "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "train.epochs=1", "log.progress_bar=off",
             "log.output_dir={tmp}/runs", "data.cache_dir={tmp}/cache"]
"""A tiny run under the cases' folder: its refusals come before any step."""

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8,
          torch.bool, torch.complex64)


def _state() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    return {"model": {"1.weight": torch.randn(3, 48, generator=generator), "1.bias": torch.zeros(3)},
            "step": 7, "classes": ["circle", "square", "triangle"],
            "config": {"optim": {"lr": 0.1, "name": "sgd"}, "data": {"image_size": 4}}}


def same(a: Any, b: Any) -> bool:
    """Equal contents: the same keys, values, tensor dtypes, shapes and data."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def saved(obj: Any, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def with_digest(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, digest.KEY: digest.content_digest(state)}


class _Global:
    """Pickled as a call of a global (``os.getcwd``, harmless): what weights_only must refuse."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.getcwd, ())


def without_member(data: bytes, suffix: str) -> bytes:
    """The zip ``data`` rewritten without its members ending in ``suffix`` (e.g. ``data.pkl``)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            if not info.filename.endswith(suffix):
                target.writestr(info, source.read(info))
    return out.getvalue()


def written(folder: str, name: str, data: bytes) -> Path:
    path = Path(folder) / name
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------ checkpoints

CHECKPOINT = saved(with_digest(_state()))
LEGACY_CHECKPOINT = saved(with_digest(_state()), legacy=True)
WRONG_CHECKPOINTS = [
    without_member(CHECKPOINT, "data.pkl"), without_member(CHECKPOINT, "/0"), saved({"model": _Global()}),
    saved({"state_dict": _state()["model"]}), saved([1, 2]), saved(torch.zeros(3)), b"hello\n", b"",
    saved({"model": "weights"}), saved(with_digest({**_state(), "model": {"1.weight": torch.zeros(2, dtype=torch.int8)}})),
]


@fuzz_settings(120)
@given(st.one_of(damaged(CHECKPOINT), damaged(LEGACY_CHECKPOINT), st.sampled_from(WRONG_CHECKPOINTS)))
def test_checkpoint_load(data: bytes) -> None:
    """checkpoint.load: exactly the saved contents, or one line naming the file."""
    with tempfile.TemporaryDirectory() as folder:
        path = written(folder, "last.pt", data)
        result = check_reader("checkpoint (checkpoint.load)", lambda: checkpoint.load(path), CheckpointError,
                              str(path), Path(folder))
        if not isinstance(result, BaseException) and data in (CHECKPOINT, LEGACY_CHECKPOINT):
            assert same(result, _state())
        elif not isinstance(result, BaseException):
            assert isinstance(result, dict) and "model" in result
            if data not in WRONG_CHECKPOINTS:  # damaged bytes: the digest lets nothing changed through
                assert same(result, _state()), "a damaged checkpoint loaded with other contents"


def _mix(seed: int = 28) -> list[tuple[str, bytes]]:
    """Issue 28's 606 variants: 150 cuts and 150 single-bit flips of a checkpoint, 100 cuts and
    150 flips of the same checkpoint in torch's legacy (non-zip) format, 50 random files, a text
    file, an empty file, and 4 legacy-format files written before digests existed, cut."""
    rng = random.Random(seed)
    variants: list[tuple[str, bytes]] = []
    for kind, data, cuts, flips in (("zip", CHECKPOINT, 150, 150), ("legacy", LEGACY_CHECKPOINT, 100, 150)):
        variants += [(f"{kind} cut", data[:cut]) for cut in sorted(rng.sample(range(len(data)), cuts))]
        for position in rng.sample(range(len(data)), flips):
            variants.append((f"{kind} flip", _flip_one(data, position, rng.randrange(8))))
    variants += [("random", rng.randbytes(rng.randrange(1, 4096))) for _ in range(50)]
    variants += [("text", b"hello\n"), ("empty", b"")]
    plain = saved(_state(), legacy=True)
    variants += [("legacy without digest, cut", plain[:cut]) for cut in rng.sample(range(len(plain)), 4)]
    return variants


def _flip_one(data: bytes, position: int, bit: int) -> bytes:
    out = bytearray(data)
    out[position] ^= 1 << bit
    return bytes(out)


def test_issue_28_mix_of_606_damaged_checkpoints(tmp_path: Path) -> None:
    """No escape, and every flip that would change the loaded contents refused: a plain
    torch.load of each flipped file shows which flips change the contents."""
    variants = _mix()
    assert len(variants) == 606
    counts = {"refused": 0, "loaded unchanged": 0, "changing flips": 0}
    for number, (kind, data) in enumerate(variants):
        path = written(str(tmp_path), f"variant_{number}.pt", data)
        try:
            loaded = checkpoint.load(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc), (kind, str(exc))
            counts["refused"] += 1
        else:
            assert same(loaded, _state()), f"{kind} #{number} loaded with other contents"
            counts["loaded unchanged"] += 1
        if "flip" in kind:
            with contextlib.suppress(Exception):
                plain = torch.load(path, weights_only=True)
                plain.pop(digest.KEY, None)
                counts["changing flips"] += not same(plain, _state())
        path.unlink()
    assert counts["refused"] + counts["loaded unchanged"] == 606 and counts["changing flips"] > 0, counts


# ---------------------------------------------------------------------------------- weights files

def _weights_model() -> torch.nn.Module:
    return build_model("linear", 3, 4)


WEIGHTS = {suffix: data for suffix, data in (
    (".pt", saved(_weights_model().state_dict())), (".pth", saved(_weights_model().state_dict(), legacy=True)),
    (".pt", CHECKPOINT))}


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save(_weights_model().state_dict(), metadata={"classes": json.dumps(["a", "b", "c"])})


SAFETENSORS = _safetensors_bytes()


def _tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


wrong_values = st.one_of(
    st.builds(_tensor, st.sampled_from(DTYPES), st.sampled_from([(3, 48), (3,), (48, 3), (), (0,), (1, 1, 1)])),
    st.integers(), st.text(max_size=5), st.none(), st.lists(st.integers(), max_size=3))
wrong_state_dicts = st.dictionaries(st.sampled_from(["1.weight", "1.bias", "module.1.weight", "_orig_mod.1.bias",
                                                     "weight", "model", "state_dict", "config", ""]),
                                    st.one_of(wrong_values, st.dictionaries(st.sampled_from(["1.weight", "1.bias"]),
                                                                            wrong_values, max_size=2)),
                                    max_size=4)


def _read_weights(path: Path) -> str:
    settings = checkpoint_data_settings(path)
    assert isinstance(settings, dict)
    return load_weights(_weights_model(), read_weight_file(path), str(path))


@fuzz_settings(100)
@given(st.one_of(st.sampled_from(list(WEIGHTS.items())).flatmap(
                     lambda item: st.tuples(st.just(item[0]), damaged(item[1]))),
                 st.tuples(st.just(".safetensors"), damaged(SAFETENSORS)),
                 st.tuples(st.sampled_from([".pt", ".pth", ".bin"]),
                           st.one_of(wrong_state_dicts.map(saved), st.just(saved({"w": _Global()}))))))
def test_weights_file(case: tuple[str, bytes]) -> None:
    """model.weights: read_weight_file and loading its tensors into the model."""
    suffix, data = case
    with tempfile.TemporaryDirectory() as folder:
        path = written(folder, f"weights{suffix}", data)
        check_reader(f"weights file ({suffix})", lambda: _read_weights(path), ConfigError, str(path), Path(folder))


# ------------------------------------------------------------------------------ exported programs

@pytest.fixture(scope="module")
def program() -> bytes:
    """A .pt2 of the linear model (3 classes, 4x4 images) as trainer.export writes it."""
    cfg = config.load(overrides=["model.name=linear", "data.image_size=4"])
    state = {"model": _weights_model().state_dict(), "classes": ["a", "b", "c"], "config": config.to_dict(cfg)}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "model.pt2"
        export.export_program(state, Path(folder) / "last.pt", out)
        return out.read_bytes()


@fuzz_settings(50)
@given(data=st.data())
def test_exported_program(program: bytes, data: st.DataObject) -> None:
    """trainer.predict's .pt2 reader: the program and its metadata."""
    damaged_program = data.draw(damaged(program))
    with tempfile.TemporaryDirectory() as folder:
        path = written(folder, "model.pt2", damaged_program)
        check_reader("exported program (.pt2)", lambda: predict.Predictor(path), UserError, str(path), Path(folder))


# ------------------------------------------------------------------------------ configs, overrides

KEYS = sorted(config.schema_keys())
DEFAULT_YAML = (Path(__file__).resolve().parents[1] / "configs" / "default.yaml").read_bytes()
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text_lines())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(text_lines(), inner, max_size=3)), max_leaves=6)
layers = st.dictionaries(st.one_of(st.sampled_from(KEYS), text_lines()), values, max_size=4)


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[leaf] = value
    return tree


yaml_files = st.one_of(damaged(DEFAULT_YAML), layers.map(lambda flat: yaml.safe_dump(_nested(flat)).encode()),
                       layers.map(lambda flat: yaml.safe_dump(_nested(flat)).encode()).flatmap(damaged),
                       st.sampled_from([b"\x00\x01\x02", b"a: &x [*x]", b"optim:\n  lr: ${oops}\n",
                                        b"[" * 5000, b"optim: !!python/object:os.getcwd {}\n"]))


@fuzz_settings(60)
@given(yaml_files)
def test_yaml_config(data: bytes) -> None:
    """-c FILE: the YAML layer, merged and checked."""
    with tempfile.TemporaryDirectory() as folder:
        path = written(folder, "run.yaml", data)
        check_reader("YAML config (-c FILE)", lambda: config.load([path]), ConfigError, None, Path(folder))


typical = st.sampled_from(["0", "1", "0.1", "-3", "1e-3", "true", "off", "[1,2,3]", "[0.5,0.5,0.5]", "sgd", "auto",
                          "classification", "", "null", "nan", "1e999", "${optim.lr}", "{a: 1}", "[", "'"])
override_tokens = st.one_of(
    st.tuples(st.sampled_from(KEYS), st.one_of(typical, text_lines())).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(st.sampled_from(KEYS), values).map(lambda kv: f"{kv[0]}={json.dumps(kv[1])}"),
    st.tuples(st.sampled_from(KEYS), text_lines()).map(lambda kv: f"--{kv[0]}={kv[1]}"),
    text_lines())


@fuzz_settings(60)
@given(st.lists(override_tokens, min_size=1, max_size=3))
def test_overrides(tokens: list[str]) -> None:
    """key=value and --key value on the command line."""
    with tempfile.TemporaryDirectory() as folder:
        def parse() -> config.Config:
            line = parse_command_line(tokens)
            return config.load((), line.overrides)

        check_reader("key=value overrides", parse, ConfigError, None, Path(folder))


# --------------------------------------------------------------------------------- the image index

@pytest.fixture(scope="module")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, image_index.ImageIndex]:
    """train/<class>/... with a nested folder; the bytes of its cached index and the scan itself."""
    split = tmp_path_factory.mktemp("images") / "train"
    for relative in ("cat/1.png", "cat/2.jpg", "dog/3.png", "dog/sub/4.png"):
        (split / relative).parent.mkdir(parents=True, exist_ok=True)
        (split / relative).write_bytes(b"")
    cache = tmp_path_factory.mktemp("index-cache")
    scanned = image_index.read_or_scan(split, cache)
    (cached,) = (cache / "image-index").iterdir()
    return split, cached.read_bytes(), scanned


def _same_index(a: image_index.ImageIndex, b: image_index.ImageIndex) -> bool:
    return (a.classes == b.classes and len(a) == len(b) and a.nested == b.nested
            and [a.relative_path(i) for i in range(len(a))] == [b.relative_path(i) for i in range(len(b))]
            and a.targets.tolist() == b.targets.tolist())


def _npz(arrays: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


index_arrays = st.fixed_dictionaries({
    "classes": st.sampled_from([["cat", "dog"], ["cat"], [], ["cat", "dog", "eel"]]),
    "paths": st.one_of(st.binary(max_size=40), st.just(b"cat/1.pngcat/2.jpgdog/3.pngdog/sub/4.png")),
    "offsets": st.lists(st.integers(-5, 60), max_size=6),
    "targets": st.lists(st.integers(-2, 3), max_size=5),
    "hidden": st.one_of(st.integers(-1, 3), st.lists(st.integers(0, 3), max_size=2)),
    "nested_names": st.sampled_from([b"", b"dog/sub", b"dog/sub\0dog/sub", b"nowhere"]),
    "nested_mtimes": st.lists(st.integers(0, 2**62), max_size=2),
}).map(lambda arrays: {k: np.frombuffer(v, dtype=np.uint8) if isinstance(v, bytes) else np.asarray(v)
                       for k, v in arrays.items()})


@fuzz_settings(60)
@given(data=st.data())
def test_image_index_cache(image_tree: tuple[Path, bytes, image_index.ImageIndex], data: st.DataObject) -> None:
    """The cached index of an ImageFolder split: read back exactly, or scanned afresh; never wrong."""
    split, cached, scanned = image_tree
    arrays = data.draw(st.one_of(damaged(cached).map(lambda d: (d, True)), index_arrays.map(lambda a: (_npz(a), False))))
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder)
        classes, version = image_index._version(split)
        path = image_index._index_path(cache, split, version)
        path.parent.mkdir(parents=True)
        path.write_bytes(arrays[0])
        result = check_reader("image index cache", lambda: image_index.read_or_scan(split, cache), (), None,
                              split.parent)
        assert isinstance(result, image_index.ImageIndex)
        if arrays[1]:
            assert _same_index(result, scanned), "a damaged index was used"
        else:  # other contents under a valid key: at least every sample is a path and a class
            assert all(0 <= t < len(result.classes) for t in result.targets.tolist())
            assert all(isinstance(result.relative_path(i), str) for i in range(len(result)))


# ------------------------------------------------------------------------------ prepared shards

@pytest.fixture(scope="module")
def prepared_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes], Any]:
    """A tiny prepared folder (python -m trainer.prepare), its files' bytes and what it reads as."""
    tmp = tmp_path_factory.mktemp("prepared")
    for split, count in (("train", 3), ("val", 1)):
        for name in ("cat", "dog"):
            (tmp / "src" / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (12 + i, 9), (40 * i, 90, 200)).save(tmp / "src" / split / name / f"{i}.png")
    prepare.prepare(tmp / "src", tmp / "dst", prepare.Options(8, shard_bytes=4096, cache_dir=str(tmp / "cache")),
                    say=lambda line: None)
    files = {p.name: p.read_bytes() for p in (tmp / "dst").iterdir()}
    return tmp / "dst", files, _read_prepared(tmp / "dst")


def _read_prepared(root: Path) -> tuple[list[str], list[list[bytes]], list[list[int]]]:
    """data.source=prepared: open both splits and read every sample."""
    train, val, classes = shards.load_splits(root)
    return classes, [[s.read(i) for i in range(len(s))] for s in (train, val)], [s.targets.tolist() for s in (train, val)]


def _npy(rows: list[tuple[int, ...]]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array(rows, dtype=shards.SAMPLE))
    return buffer.getvalue()


sample_rows = st.lists(st.tuples(st.integers(-1, 2), st.sampled_from([-512, 0, 512, 1024, 2048, 4096]),
                                 st.integers(-1, 700), st.integers(0, 2**32 - 1), st.integers(-1, 2)), max_size=6)
shard_lists = st.fixed_dictionaries({"__kind__": st.sampled_from(["wids-shard-index-v1", "other"]),
                                     "shardlist": st.lists(st.fixed_dictionaries({
                                         "url": st.sampled_from(["train-000000.tar", "val-000000.tar", "../x.tar",
                                                                 "/etc/hostname", "", "."]),
                                         "nsamples": st.one_of(st.integers(-1, 7), values),
                                         "filesize": st.one_of(st.integers(0, 10240), values),
                                         "sha256": values}), max_size=3)})


@fuzz_settings(80)
@given(data=st.data())
def test_prepared_shards(prepared_folder: tuple[Path, dict[str, bytes], Any], data: st.DataObject) -> None:
    """data.source=prepared: the manifest, the wids shard lists, the sample tables and the tar
    shards. Opened and read through, or one line naming the folder; never other bytes or classes."""
    dst, files, expected = prepared_folder
    name = data.draw(st.sampled_from(sorted(files)))
    wrong = (sample_rows.map(_npy) if name.endswith(".npy") else shard_lists.map(lambda v: json.dumps(v).encode())
             if name.endswith(".json") and name != shards.MANIFEST else st.nothing())
    content = data.draw(st.one_of(damaged(files[name]), wrong))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "dst"
        shutil.copytree(dst, root)
        (root / name).write_bytes(content)
        result = check_reader("prepared shards (data.source=prepared)", lambda: _read_prepared(root), DataError,
                              str(root), root)
        if not isinstance(result, BaseException):  # a class name in the manifest may change; samples never
            assert result[1:] == expected[1:], f"{name} damaged, yet read with other contents"


# -------------------------------------------------------------------------------- multi-label files

TRAIN_CSV = b"path,labels\ntrain/a.png,cat outdoor\n./train/b.png,dog\n"
VAL_JSON = b'{"val/c.png": ["cat"], "val/d.png": ["dog", "indoor"]}'
csv_rows = st.lists(st.tuples(st.sampled_from(["train/a.png", "train/b.png", "val/c.png", "../x.png", "/abs.png", ""]),
                              text_lines()), max_size=4)
json_objects = st.one_of(values.map(json.dumps), st.dictionaries(
    st.sampled_from(["val/c.png", "val/d.png", "train/a.png", "nope.png", ".."]), values, max_size=3).map(json.dumps))


@fuzz_settings(100)
@given(st.one_of(damaged(TRAIN_CSV).map(lambda d: ("train.csv", d)), damaged(VAL_JSON).map(lambda d: ("val.json", d)),
                 csv_rows.map(lambda rows: ("train.csv", ("path,labels\n" + "".join(f"{p},{labels}\n"
                                                                                  for p, labels in rows)).encode())),
                 json_objects.map(lambda text: ("val.json", text.encode())),
                 st.just(("val.json", b"[" * 100_000))))
def test_label_files(case: tuple[str, bytes]) -> None:
    """task.name=multilabel: train.csv / val.json under data.root."""
    name, data = case
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for image in ("train/a.png", "train/b.png", "val/c.png", "val/d.png"):
            (root / image).parent.mkdir(exist_ok=True)
            (root / image).write_bytes(b"")
        (root / "train.csv").write_bytes(TRAIN_CSV)
        (root / "val.json").write_bytes(VAL_JSON)
        (root / name).write_bytes(data)
        check_reader("label files (multi-label)", lambda: labels.read_label_files(root), DataError, str(root), root)


# ---------------------------------------------------------------------------------------- run lock

DEAD_HOLDER = json.dumps({"host": socket.gethostname(), "pid": 2**22 + 1, "job": None}).encode()
holders = st.fixed_dictionaries({"host": st.one_of(st.just(socket.gethostname()), values),
                                 "pid": st.one_of(st.integers(), values), "job": values}).map(json.dumps)


@fuzz_settings(60)
@given(st.one_of(damaged(DEAD_HOLDER), holders.map(str.encode), values.map(lambda v: json.dumps(v).encode())))
def test_run_lock(data: bytes) -> None:
    """run.lock left in a run directory: taken over, or one line naming its holder."""
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder)
        (run_dir / runlock.LOCK_NAME).write_bytes(data)

        def take() -> None:
            runlock.acquire(run_dir).release()

        check_reader("run lock", take, runlock.RunDirectoryBusy, str(run_dir), run_dir,
                     may_change=lambda path: path.endswith(runlock.LOCK_NAME))


# ------------------------------------------------------------------------------------------ report

METRICS = b'{"epoch": 1, "val/top1": 0.5, "val/loss": 1.0, "train/images_per_s": 100.0}\n' \
          b'{"epoch": 2, "val/top1": 0.75, "val/loss": 0.5, "train/images_per_s": 120.0}\n'
CONFIG_YAML = yaml.safe_dump(config.to_dict(config.load()), sort_keys=False).encode()
jsonl = st.lists(st.one_of(values, st.dictionaries(st.sampled_from(["epoch", "val/top1", "val/loss",
                                                                    "train/images_per_s", "val/ap"]), values)),
                 min_size=1, max_size=4).map(lambda lines: "".join(json.dumps(v) + "\n" for v in lines).encode())


class Refused(Exception):
    """trainer.report's exit 2 and its stderr."""


def _report(run_dir: Path) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = report.main([str(run_dir)])
    if code == 2:
        raise Refused(err.getvalue().strip())
    assert code == 0 and not err.getvalue(), (code, err.getvalue())
    return out.getvalue()


@fuzz_settings(80)
@given(st.one_of(damaged(METRICS).map(lambda d: ("metrics.jsonl", d)), jsonl.map(lambda d: ("metrics.jsonl", d)),
                 damaged(CONFIG_YAML).map(lambda d: ("config.yaml", d)),
                 layers.map(lambda flat: ("config.yaml", yaml.safe_dump(_nested(flat)).encode())),
                 values.map(lambda v: ("config.yaml", yaml.safe_dump(v).encode()))))
def test_report_inputs(case: tuple[str, bytes]) -> None:
    """python -m trainer.report RUN_DIR: metrics.jsonl and config.yaml."""
    name, data = case
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder)
        (run_dir / "metrics.jsonl").write_bytes(METRICS)
        (run_dir / "config.yaml").write_bytes(CONFIG_YAML)
        (run_dir / name).write_bytes(data)
        check_reader("report (metrics.jsonl, config.yaml)", lambda: _report(run_dir), Refused, str(run_dir), run_dir)


# ------------------------------------------------------------------------------------------ images

def _image_bytes(fmt: str, exif: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (12, 10), (200, 30, 90))
    image.putpixel((3, 4), (0, 255, 0))
    image.save(buffer, format=fmt, **({"exif": exif} if exif else {}))
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _bomb() -> bytes:
    """A 30000x30000 grey PNG (900 million pixels) of a few hundred bytes: a decompression bomb."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
    rows = zlib.compress(b"\0" * 30001 * 8, 9)
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


HUGE_EXIF = b"Exif\0\0" + b"MM\0*\0\0\0\x08" + b"\xff" * 60_000
IMAGES = [_image_bytes(fmt) for fmt in ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")] + [_image_bytes("JPEG", HUGE_EXIF)]
SPECIAL_IMAGES = [b"", _bomb(), b"not an image\n", IMAGES[0][:40], _png_chunk(b"eXIf", b"\xff" * 2_000_000)]
DATA = config.load(overrides=["data.image_size=8"]).data
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".ppm")


def _read_sample(root: Path, multi_label: bool, train: bool, skip: bool) -> torch.Tensor | None:
    if multi_label:
        (name,) = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        base: Any = labels.MultiLabelImages(root, [(name, [0])], 1)
    else:
        base = image_index.IndexedImageFolder(root, image_index.scan(root, ["c"]))
    sample = loaders.SeededTransformDataset(base, loaders.build_transform(DATA, train), 0, skip)[(0, 0)]
    if sample is None:
        assert skip, "a None sample without data.on_bad_sample=skip"
        return None
    assert sample[0].dtype == torch.uint8 and tuple(sample[0].shape) == (3, 8, 8)
    return sample[0]


@fuzz_settings(100)
@given(st.one_of(st.sampled_from(IMAGES).flatmap(damaged), st.sampled_from(IMAGES + SPECIAL_IMAGES)),
       st.sampled_from(EXTENSIONS), st.booleans(), st.booleans(), st.booleans())
@example(_bomb(), ".png", False, True, False)
def test_images(data: bytes, extension: str, multi_label: bool, train: bool, skip: bool) -> None:
    """A sample's image file through the loader's decode and transform (data.on_bad_sample)."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "c").mkdir()
        path = written(str(root / "c"), f"x{extension}", data)
        check_reader("images (data.on_bad_sample)", lambda: _read_sample(root, multi_label, train, skip),
                     DataError, str(path), root)


# ------------------------------------------------------------------------------------ command line

CLI_CASES = {
    # name: (module, arguments ({tmp} is the cases' folder), words the one error line must contain)
    "damaged .pt2 to predict": ("trainer.predict", ["{tmp}/cut.pt2", "{tmp}/image.png"],
                                ["cannot load the exported program {tmp}/cut.pt2", "export it again"]),
    "binary metrics.jsonl to report": ("trainer.report", ["{tmp}/run"], ["cannot read {tmp}/run/metrics.jsonl"]),
    "damaged .safetensors as model.weights": (
        "trainer", [*SMALL_RUN, "model.name=linear", "model.weights={tmp}/cut.safetensors"],
        ["model.weights: cannot read '{tmp}/cut.safetensors' as weights"]),
    "YAML interpolation to nowhere": ("trainer", ["-c", "{tmp}/interpolation.yaml", *SMALL_RUN],
                                      ["optim.lr: Interpolation key 'nowhere' not found"]),
}


@pytest.fixture(scope="module")
def cli_outcomes(program: bytes, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, ...]]:
    """Each case of :data:`CLI_CASES` run once, concurrently, with the folder compared before and after."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "cut.pt2").write_bytes(program[: len(program) // 2])
    Image.new("RGB", (4, 4)).save(tmp / "image.png")
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.jsonl").write_bytes(b'{"epoch": 1}\n\xff\xfe\x00junk\n')
    (tmp / "cut.safetensors").write_bytes(SAFETENSORS[: len(SAFETENSORS) // 2])
    (tmp / "interpolation.yaml").write_text("optim:\n  lr: ${nowhere}\n")

    inputs = [tmp / name for name in ("cut.pt2", "image.png", "run", "cut.safetensors", "interpolation.yaml")]

    def one(module: str, args: list[str]) -> tuple[Any, ...]:
        before = snapshot(*inputs)
        proc = subprocess.run([sys.executable, "-m", module, *(a.format(tmp=tmp) for a in args)], cwd=REPO,
                              capture_output=True, text=True, timeout=300, env=trainer_env())
        return proc, snapshot_diff(before, snapshot(*inputs))

    with ThreadPoolExecutor(len(CLI_CASES)) as pool:
        futures = {name: pool.submit(one, module, args) for name, (module, args, _) in CLI_CASES.items()}
        return {name: (*future.result(), [w.format(tmp=tmp) for w in CLI_CASES[name][2]])
                for name, future in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CLI_CASES))
def test_command_line_refuses_in_one_line(cli_outcomes: dict[str, tuple[Any, ...]], name: str) -> None:
    """The readers the CLI cases of tests/test_errors.py do not reach: exit 2, one line, nothing touched."""
    proc, changes, words = cli_outcomes[name]
    assert proc.returncode == 2, proc.stderr[-4000:]
    line = error_line(proc)
    assert all(word in line for word in words), line
    assert not changes, changes
