"""``python -m trainer.export``: safetensors and torch.export programs predict what the checkpoint does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from trainer import models
from trainer.models import weights
from trainer.tools import export
from trainer.tools.predict import Predictor
from trainer.tools.predict import main as predict_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A real (short) smallcnn run: its last checkpoint and some validation images."""
    tmp = tmp_path_factory.mktemp("export")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "--epochs", "1", "--batch-size", "16", "--workers", "0",
         "data.synthetic_classes=3", "data.synthetic_train_per_class=32", "data.synthetic_val_per_class=4",
         "data.image_size=24", f"data.cache_dir={tmp / 'cache'}", f"log.output_dir={tmp / 'runs'}",
         "log.progress_bar=off"], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    images = sorted((tmp / "cache").rglob("val/*/*.png"))
    assert len(images) == 12
    return tmp / "runs" / "default" / "checkpoints" / "last.pt", images


def probabilities(predictor: Predictor, images: list[Path]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.stack([predictor.probabilities(Image.open(path)) for path in images])


def test_pt2_program_predicts_what_the_checkpoint_predicts(trained: tuple[Path, list[Path]], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, images = trained
    out = tmp_path / "model.pt2"
    assert export.main([str(ckpt), "--format", "pt2", "-o", str(out)]) == 0
    from_checkpoint, from_program = Predictor(ckpt), Predictor(out)
    assert from_program.classes == from_checkpoint.classes
    expected = probabilities(from_checkpoint, images)
    torch.testing.assert_close(probabilities(from_program, images), expected, atol=1e-5, rtol=0)
    batch = torch.cat([from_checkpoint.prepare(Image.open(p)) for p in images])  # any batch size
    torch.testing.assert_close(from_program.model(batch).softmax(1), expected, atol=1e-5, rtol=0)
    capsys.readouterr()
    assert predict_main([str(out), str(images[0])]) == 0
    assert predict_main([str(ckpt), str(images[0])]) == 0
    by_program, by_checkpoint = capsys.readouterr().out.strip().splitlines()
    assert by_program == by_checkpoint


def test_safetensors_holds_the_weights_classes_and_config(trained: tuple[Path, list[Path]], tmp_path: Path) -> None:
    ckpt, images = trained
    out = tmp_path / "model.safetensors"
    assert export.main([str(ckpt), "--format", "safetensors", "-o", str(out)]) == 0
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    with safe_open(str(out), framework="pt") as handle:
        assert json.loads(handle.metadata()["classes"]) == state["classes"]
        assert json.loads(handle.metadata()["config"])["model"]["name"] == "smallcnn"
    tensors = weights.read_weight_file(out)
    assert tensors.keys() == state["model"].keys()
    assert all(torch.equal(tensors[k], v) for k, v in state["model"].items())
    reference = Predictor(ckpt)
    rebuilt = models.build_model("smallcnn", len(state["classes"]), 24)
    assert weights.load_weights(rebuilt, tensors, str(out)).endswith("0 replaced, 0 missing, 0 unused")
    batch = torch.cat([reference.prepare(Image.open(p)) for p in images])
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt.eval()(batch), reference.model(batch), atol=1e-5, rtol=0)


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export.main([str(tmp_path / "absent.pt"), "--format", "pt2"]) == 2
    assert capsys.readouterr().err == f"error: checkpoint not found: {tmp_path / 'absent.pt'}\n"
