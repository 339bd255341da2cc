"""CUDA-only behaviour: mixed precision on the GPU, CPU prediction from a GPU checkpoint, OOM message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def trainer(*args: str, module: str = "trainer", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def small(tmp: Path, name: str, *extra: str) -> list[str]:
    return [f"log.output_dir={tmp}", f"log.name={name}", f"data.cache_dir={tmp / 'cache'}",
            "data.synthetic_train_per_class=200", "data.synthetic_val_per_class=50", "train.epochs=4",
            "log.progress_bar=off", *extra]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cuda(tmp_path: Path, precision: str) -> None:
    result = trainer(*small(tmp_path, precision, f"train.precision={precision}", "model.channels_last=true"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"precision {precision}" in result.stdout and "on cuda:0" in result.stdout
    records = [json.loads(line) for line in (tmp_path / precision / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val/top1"] > 0.8 and records[-1]["train/loss"] < records[0]["train/loss"]
    assert records[-1]["train/peak_mem_mb"] > 0


def test_gpu_checkpoint_predicts_on_cpu(tmp_path: Path) -> None:
    assert trainer(*small(tmp_path, "gpu", "train.epochs=2")).returncode == 0
    images = sorted((tmp_path / "cache").glob("*/val/*/*.png"))[:5]
    result = trainer(str(tmp_path / "gpu" / "checkpoints" / "best.pt"), *map(str, images),
                     module="trainer.predict", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 5


def test_out_of_memory_names_the_batch_size(tmp_path: Path) -> None:
    result = trainer(*small(tmp_path, "oom", "model.name=resnet152", "data.image_size=128",
                            "data.batch_size=4096", "data.synthetic_train_per_class=700",
                            "data.synthetic_classes=6", "data.num_workers=4", "train.precision=fp32"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "data.batch_size=4096" in result.stderr and "train.grad_accum_steps=2" in result.stderr
