"""``python -m trainer.report`` over two real runs: the table, the differing keys, the PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny runs that differ in the learning rate and the number of epochs, trained side by side."""
    tmp = tmp_path_factory.mktemp("report")
    common = [sys.executable, "-m", "trainer", f"log.output_dir={tmp / 'runs'}", f"data.cache_dir={tmp / 'cache'}",
              "data.synthetic_classes=3", "data.synthetic_train_per_class=32", "data.synthetic_val_per_class=8",
              "data.image_size=16", "data.batch_size=16", "data.num_workers=0", "model.name=linear",
              "log.progress_bar=off", "log.trackers=[jsonl]", "log.pictures=false"]
    jobs = [subprocess.Popen(common + [f"log.name={name}", f"optim.lr={lr}", f"train.epochs={epochs}"], cwd=REPO,
                             env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name, lr, epochs in (("lr-0.1", 0.1, 3), ("lr-0.01", 0.01, 2))]
    for job in jobs:
        output = job.communicate(timeout=300)[0]
        assert job.returncode == 0, output
    return tmp / "runs"


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.report", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_report_prints_one_row_per_run_with_the_differing_config_keys(two_runs: Path) -> None:
    result = report(str(two_runs / "lr-0.1"), str(two_runs / "lr-0.01"))
    assert result.returncode == 0, result.stderr
    header, rule, *rows = result.stdout.splitlines()
    assert header.split() == ["run", "epochs", "val/top1", "val/loss", "best", "val/top1", "images/s",
                              "optim.lr", "train.epochs"]
    assert set(rule) == {"-", " "}
    assert [row.split()[:2] for row in rows] == [["lr-0.1", "3"], ["lr-0.01", "2"]]
    for row, name in zip(rows, ("lr-0.1", "lr-0.01")):
        last = json.loads((two_runs / name / "metrics.jsonl").read_text().splitlines()[-1])
        assert row.split()[2] == f"{last['val/top1']:.4f}"
        assert row.split()[-2:] == [name[3:], str(last["epoch"])]


@pytest.mark.slow
def test_report_plot_writes_a_png_of_the_validation_curves(two_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    result = report(str(two_runs / "lr-0.1"), str(two_runs / "lr-0.01"), "--plot", str(out))
    assert result.returncode == 0, result.stderr
    assert f"plot: {out}" in result.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width >= 2 * image.height  # panels side by side
        colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert {(31, 119, 180), (255, 127, 14)} <= colours  # one line colour per run


def test_report_on_a_folder_that_is_no_run_is_one_error_line(tmp_path: Path) -> None:
    result = report(str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {tmp_path} has no metrics.jsonl: not a run directory, or no epoch "
                                     "finished yet (runs need log.trackers to include jsonl)")
