"""`python -m bench --quick` runs end to end, and both sides of each comparison do the same work.

No timing is asserted here (timings belong to the benchmark's report, not to tests). The
in-memory throughput and scaling cases are left out to keep this short (they go through the same
child runner, bench/versus.py, as the cases here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    folder = tmp_path_factory.mktemp("bench")
    path = folder / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # as a user's shell: unset
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--cases", "files,overhead,startup",
                             "--nproc", "1", "--cache-dir", str(folder / "cache"), "--json", str(path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(path.read_text())


def test_every_case_reports_both_sides(report: tuple[subprocess.CompletedProcess, dict]) -> None:
    result, data = report
    cases = [row["case"] for row in data["rows"]]
    assert [case.split()[:2] for case in cases] == [["files:", "jpeg"], ["files:", "png"], ["tiny", "steps:"],
                                                    ["start-up", "to"]]
    for row in data["rows"]:
        assert row["worker"] > 0 and row["baseline"] > 0 and row["pair_ratios"]
        assert row["case"] in result.stdout


def test_worker_and_hand_written_loop_train_the_same_model_on_the_same_samples(
        report: tuple[subprocess.CompletedProcess, dict]) -> None:
    """Both sides name the same architecture with the same parameter count and train as many
    samples per epoch; the files cases read real JPEG and PNG files."""
    details = report[1]["details"]
    assert set(details) == {"files jpeg 1p", "files png 1p", "overhead", "startup"}
    for name, detail in details.items():
        if name == "startup":
            continue
        worker, plain = detail["same_work"]["worker"], detail["same_work"]["hand-written"]
        assert worker == plain and len(worker) == 1, name
        model, parameters, samples = worker[0]
        assert model == "linear" and parameters > 0 and samples > 0, name
    cache = Path(report[1]["details"]["files jpeg 1p"]["runs"]["hand-written"][0]["extra"]["root"])
    assert any(cache.rglob("*.jpg"))


def test_the_hand_written_side_runs_as_a_users_script(report: tuple[subprocess.CompletedProcess, dict]) -> None:
    """The script gets the user's environment, not the wait policy the trainer chose for itself."""
    for name in ("files jpeg 1p", "files png 1p", "overhead"):
        for run in report[1]["details"][name]["runs"]["hand-written"]:
            assert run["extra"]["omp_wait_policy"] is None, name


def test_start_up_is_timed_by_the_workers_own_log_line(report: tuple[subprocess.CompletedProcess, dict]) -> None:
    """``python -m trainer`` runs unmodified: its "first optimizer step done" line ends the timing."""
    marks = report[1]["details"]["startup"]["marks"]
    assert set(marks["worker"]) == {"built", "first_step"}
    assert set(marks["hand-written"]) == {"python_up", "imports", "built", "first_step"}
    for side in marks.values():
        assert 0 < side["built"][0] < side["first_step"][0]
