"""A short real training run end to end: learning, logs, TensorBoard, checkpoints, predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, small_run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer import checkpoint, models

EPOCHS = 5


def run_module(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def small_run_args(tmp: Path, name: str) -> list[str]:
    # optim.lr 0.1 as the rate itself: at 0.1 x 32/256 these 5 short epochs learn too little for predict's check
    return small_run(tmp, f"log.name={name}", f"train.epochs={EPOCHS}", "data.num_workers=1", "optim.lr_base_batch=0",
                     train_per_class=150, val_per_class=30, image_size=24, batch_size=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("train")
    result = run_module("trainer", *small_run_args(tmp, "e2e"))
    assert result.returncode == 0, result.stderr
    return tmp / "runs" / "e2e", result


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_accuracy_rises(trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    records = history(trained[0])
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    first, last = records[0], records[-1]
    assert last["train/loss"] < first["train/loss"] * 0.8
    assert last["val/top1"] > first["val/top1"] and last["val/top1"] > 0.6, "3 classes: chance is 0.33"
    for key in ("val/top5", "val/precision", "val/recall", "val/f1", "train/lr", "train/images_per_s"):
        assert key in last


def test_console_ends_with_paths_of_logs_and_checkpoints(trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir, result = trained
    assert "resolved config:" in result.stdout
    assert f"epoch {EPOCHS}/{EPOCHS}" in result.stdout
    assert str(run_dir / "checkpoints" / "best.pt") in result.stdout
    assert str(run_dir / "metrics.jsonl") in result.stdout


def test_tensorboard_event_file_reads_back(trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir = trained[0]
    event_files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in ("train/loss", "val/top1", "val/f1", "train/lr"):
        assert tag in scalars
    top1 = [event.value for event in acc.Scalars("val/top1")]
    assert top1 == pytest.approx([r["val/top1"] for r in history(run_dir)])
    assert "config/text_summary" in acc.Tags()["tensors"]
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(acc.PluginTagToContent("hparams"))


def test_checkpoint_round_trip(trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir = trained[0]
    folder = run_dir / "checkpoints"
    state = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == EPOCHS and len(state["classes"]) == 3
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in state["model"])
    best = torch.load(folder / "best.pt", map_location="cpu", weights_only=True)
    assert best["best"] == max(r["val/top1"] for r in history(run_dir)) == state["best"]
    model = models.build_model("smallcnn", len(state["classes"]), 24)
    checkpoint.load_model_weights(model, state["model"], folder / "last.pt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["model"][name])


def test_evaluate_needs_only_the_checkpoint_and_a_validation_split(
        trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    """Model, data and image size come from the checkpoint's saved config; the train split (here
    one image per class, fewer than a batch) is never built."""
    run_dir = trained[0]
    evaluated = run_module("trainer.evaluate", str(run_dir / "checkpoints" / "last.pt"),
                           "data.synthetic_train_per_class=1")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert metrics["top1"] == pytest.approx(history(run_dir)[-1]["val/top1"])
    assert metrics["samples"] == 3 * 30


def test_evaluate_refuses_data_with_other_classes(trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    evaluated = run_module("trainer.evaluate", str(trained[0] / "checkpoints" / "last.pt"),
                           "data.synthetic_classes=4", "data.synthetic_train_per_class=1")
    assert evaluated.returncode == 2
    assert evaluated.stderr.startswith("error: ") and len(evaluated.stderr.strip().splitlines()) == 1
    assert "was trained on classes" in evaluated.stderr


def test_finished_run_is_not_trained_again(trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir = trained[0]
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    again = run_module("trainer", *small_run_args(run_dir.parent.parent, "e2e"))
    assert again.returncode == 0, again.stderr
    assert "already finished" in again.stdout
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
    assert len(history(run_dir)) == EPOCHS


def test_predict_classifies_saved_images(trained: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> None:
    run_dir = trained[0]
    cache = run_dir.parent.parent / "cache"
    val_root = next(cache.glob("*/val"))
    images = sorted(val_root.glob("*/*.png"))[::7]
    folder = tmp_path / "to_classify"
    folder.mkdir()
    for image in images:
        (folder / f"{image.parent.name}_{image.name}").write_bytes(image.read_bytes())
    result = run_module("trainer.predict", str(run_dir / "checkpoints" / "best.pt"), str(folder), "-k", "2",
                        env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(images)
    correct = 0
    for line in lines:
        path, ranked = line.split("\t")
        (top_class, top_p), (_, second_p) = [pair.rsplit(" ", 1) for pair in ranked.split("  ")]
        assert 0 <= float(second_p) <= float(top_p) <= 1
        correct += Path(path).name.startswith(top_class + "_")
    assert correct / len(lines) > 0.6


def test_predict_rejects_a_folder_without_images(trained: tuple[Path, subprocess.CompletedProcess],
                                                  tmp_path: Path) -> None:
    result = run_module("trainer.predict", str(trained[0] / "checkpoints" / "best.pt"), str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("error: no image files")
