"""Stopping where it is least convenient: during validation, under torchrun with 2 processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sigterm_during_validation_stops_at_once_with_one_checkpoint(tmp_path: Path) -> None:
    """Validation is slow here (ResNet-152, one image per batch, 600 per rank); a SIGTERM in its
    middle ends the job within seconds, with one checkpoint at the end of the epoch's training."""
    args = [f"log.output_dir={tmp_path}", "log.name=val", f"data.cache_dir={tmp_path / 'cache'}",
            "model.name=resnet152", "data.image_size=64", "data.synthetic_classes=6",
            "data.synthetic_train_per_class=4", "data.synthetic_val_per_class=200", "data.batch_size=4",
            "data.val_batch_size=1", "data.num_workers=0", "train.epochs=1", "log.progress_bar=off",
            "log.debug=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "trainer", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert job.stdout is not None
    output = []
    for line in job.stdout:
        output.append(line)
        if "validating 1200 samples" in line:
            break
    time.sleep(2)  # well into validation
    signalled = time.monotonic()
    job.send_signal(signal.SIGTERM)
    output += job.communicate(timeout=120)[0].splitlines(keepends=True)
    took = time.monotonic() - signalled
    text = "".join(output)
    assert "stopped by SIGTERM at epoch 1, 24 of 24 samples" in text, text
    assert took < 15, f"{took:.1f} s after SIGTERM: validation was not cut short\n{text}"
    steps = sorted((tmp_path / "val" / "checkpoints").glob("step_*.pt"))
    assert len(steps) == 1, "one save, not two"
    state = torch.load(steps[0], weights_only=True)
    assert state["position"] == {"epoch": 0, "consumed": 24} and state["history"] == []
    assert not (tmp_path / "val" / "metrics.jsonl").exists() or not (tmp_path / "val" / "metrics.jsonl").read_text()
