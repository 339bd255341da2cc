"""The defaults converge on a small real set: scikit-learn's digits (1,797 real 8x8 scans) as PNG
files in an image folder, resnet18 at 32 px, 6 epochs, batch 64, no optimizer or schedule override.

One seed on one process here; ``make converge`` runs seeds 0-3 on one process and seed 0 on two
(bench/converge.py; the spread is in docs/recipes.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, child_env

pytestmark = pytest.mark.slow


def test_the_defaults_converge_on_the_digits_with_one_process(tmp_path: Path) -> None:
    summary_path = tmp_path / "converge.json"
    result = subprocess.run([sys.executable, "-m", "bench.converge", "--seeds", "0", "--two-process-seeds",
                             "--out", str(tmp_path), "--json", str(summary_path)],
                            cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900)
    assert summary_path.exists(), result.stdout + result.stderr[-3000:]
    run = json.loads(summary_path.read_text())["runs"][0]
    assert len(list((tmp_path / "digits" / "train").rglob("*.png"))) == 1437  # the 80 % split, as files
    assert run["peak_lr"].startswith(" 0.025 (optim.lr 0.1 x 64/256"), run["peak_lr"]  # linear scaling to 64
    assert run["final_top1"] >= 0.97, run
    assert run["max_loss_ratio"] <= 3.0, run
    assert result.returncode == 0, result.stdout
