"""Bad input and faults: one clear error line, and nothing lost.

Every case runs the real CLI (``python -m trainer``) in a subprocess and checks that it

* exits with the documented code (2 for a user error) or carries on where that is the contract,
* prints exactly ONE line on stderr, ``error: ...``, naming what is wrong and how to fix it (no traceback),
* leaves the existing run directories, checkpoints and data it was pointed at byte-identical,
  with the same mtimes (see :func:`refusals.snapshot`).

The cases of a section are independent, so each section runs them concurrently in a module fixture
and the parametrized tests only read the outcomes. docs/errors.md lists every case and its message.
Mount-based cases (read-only run directory, full disk, small /dev/shm) need root (CAP_SYS_ADMIN)
and are skipped with the reason otherwise. The subprocess cases are marked ``slow``; the CUDA
out-of-memory case is marked ``gpu`` and skipped without CUDA.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from refusals import (Case, Outcome, check_refused, copy_run, error_line, make_existing_run, run_cases, run_trainer,
                      snapshot, snapshot_diff, tmpfs)

FAST = ("data.synthetic_classes=3", "data.synthetic_train_per_class=16", "data.synthetic_val_per_class=4",
        "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "train.epochs=1",
        "log.progress_bar=off")
"""A run of a few seconds: 48 training and 12 validation images of 16x16 pixels, one epoch."""


# --------------------------------------------------------------------------------- shared fixtures

@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("errors")


@pytest.fixture(scope="module")
def cache(work: Path) -> Path:
    """The synthetic data cache with the FAST set generated (as the Worker would)."""
    from trainer.data.synthetic import SyntheticSpec, ensure_synthetic_dataset

    cache = work / "cache"
    ensure_synthetic_dataset(cache, SyntheticSpec(num_classes=3, train_per_class=16, val_per_class=4,
                                                  image_size=16, seed=0))
    return cache


@pytest.fixture(scope="module")
def shapes(cache: Path) -> Path:
    """The generated ImageFolder tree (train/<class>/*.png, val/<class>/*.png)."""
    (root,) = [p for p in cache.iterdir() if p.name.startswith("shapes-c3-")]
    return root


@pytest.fixture(scope="module")
def base_run(work: Path, cache: Path) -> Path:
    """A finished one-epoch run (smallcnn, 3 classes): step_*.pt, last.pt, best.pt, logs, metrics."""
    proc = run_trainer([*FAST, f"data.cache_dir={cache}", f"log.output_dir={work / 'runs'}", "log.name=base"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = work / "runs" / "base"
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    return run_dir


# ------------------------------------------------------------------------------------------ config

CONFIG_CASES = [
    # name, arguments ({tmp} is the section's folder), words the error line must contain
    ("unknown_key", ["optim.lrr=0.1"], ["unknown key 'optim.lrr'", "did you mean 'optim.lr'"]),
    ("unknown_key_in_yaml", ["-c", "{tmp}/unknown.yaml"],
     ["unknown key 'optim.lrr' in {tmp}/unknown.yaml", "did you mean 'optim.lr'"]),
    ("wrong_type", ["data.batch_size=abc"], ["data.batch_size: expected int, got 'abc'"]),
    ("wrong_type_in_yaml", ["-c", "{tmp}/wrongtype.yaml"],
     ["train.epochs: expected int, got 'many'", "{tmp}/wrongtype.yaml"]),
    ("not_key_value", ["optim.lr"], ["override 'optim.lr' must look like key=value"]),
    ("negative_lr", ["optim.lr=-0.1"], ["optim.lr: must be > 0, got -0.1"]),
    ("zero_batch", ["data.batch_size=0"], ["data.batch_size: must be > 0, got 0"]),
    ("unknown_optimizer", ["optim.name=sgdd"],
     ["optim.name: 'sgdd' is not one of sgd, adam, adamw, adagrad", "did you mean 'sgd'"]),
    ("unknown_model", ["model.name=resnet19"], ["model.name: unknown model 'resnet19'", "resnet18"]),
    ("unknown_precision", ["train.precision=fp8"],
     ["train.precision: 'fp8' is not one of auto, fp32, bf16, fp16", "did you mean"]),
    ("missing_yaml", ["-c", "{tmp}/missing.yaml"], ["config file not found: {tmp}/missing.yaml"]),
    ("malformed_yaml", ["-c", "{tmp}/malformed.yaml"],
     ["config file {tmp}/malformed.yaml is not valid YAML", "line 2"]),
    ("ce_for_multilabel", ["task.name=multilabel", "task.loss=ce"],
     ["task.loss=ce: multilabel's labels are independent", "task.loss=auto or bce"]),
]


@pytest.fixture(scope="module")
def config_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    tmp = tmp_path_factory.mktemp("config")
    (tmp / "unknown.yaml").write_text("optim:\n  lrr: 0.1\n")
    (tmp / "wrongtype.yaml").write_text("train:\n  epochs: many\n")
    (tmp / "malformed.yaml").write_text("optim:\n  lr: [0.1\n  name: sgd\n")
    make_existing_run(tmp / "runs" / "existing")
    common = [*FAST, f"data.cache_dir={tmp / 'cache'}", f"log.output_dir={tmp / 'runs'}", "log.name=existing"]
    cases = [Case(name, tuple(common + [a.format(tmp=tmp) for a in args]),
                  tuple(w.format(tmp=tmp) for w in words), watch=(tmp,))
             for name, args, words in CONFIG_CASES]
    return run_cases(cases)


@pytest.mark.slow
@pytest.mark.parametrize("name", [c[0] for c in CONFIG_CASES])
def test_config_error_is_one_line_and_touches_nothing(config_outcomes: dict[str, Outcome], name: str) -> None:
    check_refused(config_outcomes[name])


# -------------------------------------------------------------------------------------------- data

DATA_ERROR_CASES = [
    ("missing_root", ["data.root '{root}' does not exist", "data.root"]),
    ("no_train_folder", ["data.root '{root}' has no train/ folder", "{root}/train/<class>/<image>"]),
    ("no_val_folder", ["data.root '{root}' has no val/ folder", "{root}/val/<class>/<image>"]),
    ("empty_class_folder", ["{root}/train", "no valid file for the classes triangle"]),
    ("class_mismatch", ["train/ and val/ under '{root}' have different classes",
                        "only in train: ['triangle']", "only in val: ['triangel']"]),
    ("truncated_image", ["cannot read sample '{root}/train/square/00003.png'", "truncated",
                         "data.on_bad_sample=skip"]),
    ("text_as_jpg", ["cannot read sample '{root}/train/triangle/fake.jpg'", "cannot identify image file",
                     "data.on_bad_sample=skip"]),
]


def _data_tree(shapes: Path, root: Path, name: str) -> Path:
    """``shapes`` copied to ``root`` and damaged the way case ``name`` needs."""
    if name == "missing_root":
        return root
    shutil.copytree(shapes, root, ignore=shutil.ignore_patterns("*.json"))
    if name == "no_train_folder":
        shutil.rmtree(root / "train")
    elif name == "no_val_folder":
        shutil.rmtree(root / "val")
    elif name == "empty_class_folder":
        for image in (root / "train" / "triangle").iterdir():
            image.unlink()
    elif name == "class_mismatch":
        (root / "val" / "triangle").rename(root / "val" / "triangel")
    elif name == "truncated_image":
        image = root / "train" / "square" / "00003.png"
        image.write_bytes(image.read_bytes()[:100])
    elif name in ("text_as_jpg", "text_as_jpg_skipped", "notes_txt"):
        # a non-image among the images: .txt is not an image extension, fake.jpg is one
        (root / "train" / "notes.txt").write_text("where these images come from\n")
        (root / "train" / "triangle" / "notes.txt").write_text("drawn by hand\n")
        if name != "notes_txt":  # replaces a real image: still 48 samples, 6 full batches of 8
            (root / "train" / "triangle" / "00000.png").unlink()
            (root / "train" / "triangle" / "fake.jpg").write_text("this is text, not a JPEG\n")
    return root


@pytest.fixture(scope="module")
def data_outcomes(work: Path, cache: Path, shapes: Path) -> dict[str, Outcome]:
    names = [c[0] for c in DATA_ERROR_CASES] + ["notes_txt", "text_as_jpg_skipped"]
    cases = []
    for name in names:
        root = _data_tree(shapes, work / "data" / name, name)
        words = next((w for n, w in DATA_ERROR_CASES if n == name), [])
        args = [*FAST, f"data.cache_dir={cache}", f"log.output_dir={work / 'runs'}", f"log.name=data_{name}",
                "data.source=imagefolder", f"data.root={root}"]
        if name == "text_as_jpg_skipped":
            args.append("data.on_bad_sample=skip")
        cases.append(Case(name, tuple(args), tuple(w.format(root=root) for w in words),
                          watch=(root, shapes), code=2 if words else 0))
    return run_cases(cases)


@pytest.mark.slow
@pytest.mark.parametrize("name", [c[0] for c in DATA_ERROR_CASES])
def test_data_error_is_one_line_and_touches_nothing(data_outcomes: dict[str, Outcome], name: str) -> None:
    check_refused(data_outcomes[name])


@pytest.mark.slow
def test_text_files_among_images_are_ignored(data_outcomes: dict[str, Outcome], work: Path) -> None:
    """ImageFolder picks images by extension: notes.txt is not a sample, training just works."""
    outcome = data_outcomes["notes_txt"]
    assert outcome.proc.returncode == 0, outcome.proc.stderr[-4000:]
    assert "48 train / 12 val samples" in outcome.proc.stdout
    assert not snapshot_diff(outcome.before, outcome.after)
    assert (work / "runs" / "data_notes_txt" / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_unreadable_image_is_skipped_and_counted(data_outcomes: dict[str, Outcome], work: Path) -> None:
    """data.on_bad_sample=skip: the run goes on, exit 0, and says how many samples it skipped."""
    outcome = data_outcomes["text_as_jpg_skipped"]
    proc = outcome.proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert "skipped 1 unreadable samples" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in
               (work / "runs" / "data_text_as_jpg_skipped" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["data/skipped_samples"] == 1
    assert records[-1]["train/samples"] == 47, "every readable image was trained on"
    assert not snapshot_diff(outcome.before, outcome.after)


# ------------------------------------------------------------------------------------- checkpoints

class _Exploit:
    """Unpickling this calls os.mkdir(marker): a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


CKPT_CASES = [
    ("missing_file", ["ckpt.resume: checkpoint '{tmp}/nowhere.pt' not found", "auto, never or a file path"]),
    ("truncated_file", ["cannot read checkpoint {tmp}/truncated.pt: truncated or not a checkpoint"]),
    ("text_file", ["cannot read checkpoint {tmp}/notes.pt: truncated or not a checkpoint"]),
    ("damaged_contents", ["checkpoint {tmp}/damaged.pt is damaged: its contents do not match its digest",
                          "use an older checkpoint"]),
    ("pickled_object", ["refusing to load {tmp}/exploit.pt: it holds a pickled Python object",
                        "only load checkpoints you trust"]),
    ("other_model", ["{base}/checkpoints/last.pt does not match the model", "check model.name"]),
    ("other_class_count", ["{base}/checkpoints/last.pt was trained on classes ['circle', 'square', 'triangle']",
                           "but the data has ['circle', 'cross', 'square', 'triangle']"]),
    ("never_with_checkpoints", ["ckpt.resume=never but {runs}/never_with_checkpoints already holds checkpoints",
                                "choose another log.name"]),
    # resume=auto inside an existing run directory: the run directory itself must survive the refusal
    ("auto_other_model", ["{runs}/auto_other_model/checkpoints/last.pt does not match the model"]),
    ("auto_truncated_last", ["cannot read checkpoint {runs}/auto_truncated_last/checkpoints/last.pt",
                             "truncated", "no older readable checkpoint"]),
    ("auto_data_missing", ["data.root '{tmp}/moved' does not exist"]),
]


@pytest.fixture(scope="module")
def ckpt_outcomes(work: Path, cache: Path, shapes: Path, base_run: Path) -> dict[str, Outcome]:
    tmp, runs = work / "ckpt", work / "runs"
    tmp.mkdir()
    last = base_run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp / "notes.pt").write_text("hello\n")
    damaged = torch.load(last, weights_only=True)  # a changed weight under the old digest: damage that loads
    next(iter(damaged["model"].values())).view(-1)[0] += 1
    torch.save(damaged, tmp / "damaged.pt")
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _Exploit(tmp / "PWNED")}, tmp / "exploit.pt")
    for name in ("never_with_checkpoints", "auto_other_model", "auto_truncated_last", "auto_data_missing"):
        copy_run(base_run, runs / name)
    for copied in (runs / "auto_truncated_last" / "checkpoints").glob("*.pt"):  # nothing to fall back on
        os.truncate(copied, copied.stat().st_size // 2)
    shared = (base_run, shapes)  # not all of the cache: other_class_count adds a 4-class set to it
    extra = {
        "missing_file": ([f"ckpt.resume={tmp / 'nowhere.pt'}"], shared),
        "truncated_file": ([f"ckpt.resume={tmp / 'truncated.pt'}"], (*shared, tmp / "truncated.pt")),
        "text_file": ([f"ckpt.resume={tmp / 'notes.pt'}"], (*shared, tmp / "notes.pt")),
        "damaged_contents": ([f"ckpt.resume={tmp / 'damaged.pt'}"], (*shared, tmp / "damaged.pt")),
        "pickled_object": ([f"ckpt.resume={tmp / 'exploit.pt'}"], (*shared, tmp / "exploit.pt", tmp / "PWNED")),
        "other_model": ([f"ckpt.resume={last}", "model.name=linear"], shared),
        "other_class_count": ([f"ckpt.resume={last}", "data.synthetic_classes=4"], shared),
        "never_with_checkpoints": (["ckpt.resume=never"], (runs / "never_with_checkpoints", shapes)),
        "auto_other_model": (["model.name=linear"], (runs / "auto_other_model", shapes)),
        "auto_truncated_last": ([], (runs / "auto_truncated_last", shapes)),
        "auto_data_missing": (["data.source=imagefolder", f"data.root={tmp / 'moved'}"],
                              (runs / "auto_data_missing", shapes)),
    }
    cases = []
    for name, words in CKPT_CASES:
        args, watch = extra[name]
        cases.append(Case(name, (*FAST, f"data.cache_dir={cache}", f"log.output_dir={runs}", f"log.name={name}",
                                 *args),
                          tuple(w.format(tmp=tmp, base=base_run, runs=runs) for w in words), watch=watch))
    return run_cases(cases)


@pytest.mark.slow
@pytest.mark.parametrize("name", [c[0] for c in CKPT_CASES])
def test_checkpoint_error_is_one_line_and_touches_nothing(ckpt_outcomes: dict[str, Outcome], name: str) -> None:
    check_refused(ckpt_outcomes[name])


@pytest.mark.slow
def test_pickled_object_is_never_executed(ckpt_outcomes: dict[str, Outcome], work: Path) -> None:
    assert ckpt_outcomes["pickled_object"].proc.returncode == 2
    assert not (work / "ckpt" / "PWNED").exists(), "loading the checkpoint ran the code pickled in it"


# --------------------------------------------------------------------------------- run directory

@pytest.mark.slow
def test_run_directory_under_a_file(tmp_path: Path) -> None:
    """Root ignores permission bits, so make the run directory impossible: a path through a file."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder\n")
    case = Case("under_a_file", (*FAST, f"data.cache_dir={tmp_path / 'cache'}", f"log.output_dir={blocker}/sub"),
                (f"cannot write the run directory {blocker}/sub/default (Not a directory)",
                 "choose a writable log.output_dir"), watch=(tmp_path,))
    check_refused(run_cases([case])[case.name])


@pytest.mark.slow
def test_run_directory_on_read_only_filesystem(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        case = Case("read_only", (*FAST, f"data.cache_dir={tmp_path / 'cache'}", f"log.output_dir={ro}/runs"),
                    (f"cannot write the run directory {ro}/runs/default (Read-only file system)",
                     "choose a writable log.output_dir"), watch=(ro,))
        check_refused(run_cases([case])[case.name])


# ------------------------------------------------------------------------------------- disk full

@pytest.mark.slow
def test_disk_full_while_writing_a_checkpoint(tmp_path: Path, base_run: Path, cache: Path) -> None:
    """A filesystem with room for one checkpoint: continuing the run for another epoch must fail at
    the second checkpoint with one line, and leave the first one intact and loadable."""
    from trainer import checkpoint

    step = checkpoint.step_files(base_run / "checkpoints")[-1]
    size_kib = int(step.stat().st_size * 1.5) // 1024  # one checkpoint fits, a second does not
    with tmpfs(tmp_path / "small", f"size={size_kib}k") as mount:
        run_dir = mount / "run"
        folder = run_dir / "checkpoints"
        folder.mkdir(parents=True)
        for name in ("config.yaml", "metrics.jsonl"):
            shutil.copy2(base_run / name, run_dir / name)
        shutil.copy2(step, folder / step.name)
        os.link(folder / step.name, folder / "last.pt")
        os.link(folder / step.name, folder / "best.pt")
        files = sorted(folder.iterdir())
        before = snapshot(*files)
        proc = run_trainer([*FAST, f"data.cache_dir={cache}", f"log.output_dir={mount}", "log.name=run",
                            "train.epochs=2"])
        after = snapshot(*files)
        assert proc.returncode != 0, proc.stdout[-2000:]
        line = error_line(proc)
        assert "No space left on device" in line and "checkpoint" in line, line
        assert not snapshot_diff(before, after), snapshot_diff(before, after)
        assert sorted(folder.iterdir()) == files, "a partial checkpoint or temp file was left behind"
        state = checkpoint.load(folder / "last.pt")
        assert state["epoch"] == 1 and state["global_step"] == int(step.stem.split("_")[1])


# ----------------------------------------------------------------------------------- environment

@pytest.fixture(scope="module")
def env_outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    tmp = tmp_path_factory.mktemp("env")
    make_existing_run(tmp / "runs" / "existing")
    common = (*FAST, f"data.cache_dir={tmp / 'cache'}", f"log.output_dir={tmp / 'runs'}", "log.name=existing")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rank0_of_2 = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cases = [
            Case("cuda_absent", (*common, "dist.device=cuda"),
                 ("dist.device=cuda but no CUDA device is visible", "dist.device=auto or cpu"), watch=(tmp,)),
            Case("mps_absent", (*common, "dist.device=mps"),
                 ("dist.device=mps but MPS is not available", "dist.device=auto or cpu"), watch=(tmp,)),
            Case("busy_master_port", (*common, "dist.device=cpu", "dist.timeout_s=10"),
                 (f"127.0.0.1:{port}", "EADDRINUSE", "choose another MASTER_PORT"), watch=(tmp,), env=rank0_of_2),
        ]
        yield run_cases(cases)


@pytest.mark.slow
def test_cuda_requested_but_absent(env_outcomes: dict[str, Outcome]) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: dist.device=cuda is not an error")
    check_refused(env_outcomes["cuda_absent"])


@pytest.mark.slow
def test_mps_requested_but_absent(env_outcomes: dict[str, Outcome]) -> None:
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        pytest.skip("MPS is available here: dist.device=mps is not an error")
    check_refused(env_outcomes["mps_absent"])


@pytest.mark.slow
def test_busy_master_port(env_outcomes: dict[str, Outcome]) -> None:
    check_refused(env_outcomes["busy_master_port"])


def test_small_shared_memory_warning_names_the_fix(tmp_path: Path) -> None:
    from trainer.data.loaders import shared_memory_warning

    batch_bytes = 64 * 3 * 64 * 64 * 4  # 3 MiB
    with tmpfs(tmp_path / "shm", "size=1m") as shm:
        warning = shared_memory_warning(2, batch_bytes, str(shm))
        assert warning is not None
        assert "\n" not in warning
        assert str(shm) in warning and "2 DataLoader workers" in warning
        assert "--shm-size" in warning and "data.num_workers=0" in warning
        assert shared_memory_warning(0, batch_bytes, str(shm)) is None, "no workers, no shared memory"
        assert shared_memory_warning(1, 1024, str(shm)) is None, "8 KiB of batches fit in 1 MiB"


# ------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_out_of_memory_names_the_batch_size(tmp_path: Path) -> None:
    """A batch far too large for the GPU: one line naming data.batch_size and grad_accum_steps."""
    from PIL import Image

    size, batch = 224, 2048  # every activation tensor stays below 2**31 elements
    image = tmp_path / "image.png"
    Image.new("RGB", (size, size), (200, 80, 40)).save(image)
    for split, count in (("train", batch // 2), ("val", 1)):
        for cls in ("a", "b"):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i:05d}.png").symlink_to(image)
    # resnet50 in fp32 keeps ~100 MB of activations per 224x224 image: ~200 GB for 2048 of them.
    # No DataLoader workers: their prefetched batches would need ~20 GB of /dev/shm.
    proc = run_trainer(["data.source=imagefolder", f"data.root={tmp_path / 'data'}", f"data.image_size={size}",
                        f"data.batch_size={batch}", "data.num_workers=0", "model.name=resnet50",
                        "train.precision=fp32", "train.cudnn_benchmark=false", "train.epochs=1",
                        "log.progress_bar=off", f"log.output_dir={tmp_path / 'runs'}"])
    assert proc.returncode == 2, proc.stderr[-4000:]
    line = error_line(proc)
    assert "ran out of memory" in line and f"data.batch_size={batch}" in line, line
    assert f"data.batch_size={batch // 2}" in line and "train.grad_accum_steps=2" in line, line
