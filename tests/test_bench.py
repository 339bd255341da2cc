"""`python -m bench --quick` runs end to end and both sides of each comparison do the same work.

No timing is asserted here (timings belong to the benchmark's report, not to tests).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--cases", "throughput,overhead,startup",
                             "--json", str(path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(path.read_text())


def test_every_case_reports_both_sides(report: tuple[subprocess.CompletedProcess, dict]) -> None:
    result, data = report
    cases = [row["case"] for row in data["rows"]]
    assert [case.split()[0] for case in cases] == ["throughput", "tiny", "start-up"]
    for row in data["rows"]:
        assert row["worker"] > 0 and row["baseline"] > 0 and row["pair_ratios"]
        assert row["case"] in result.stdout
    marks = data["details"]["startup"]["marks"]
    for side in ("worker", "hand-written"):
        phases = [marks[side][name][0] for name in ("python_up", "imports", "built", "first_step")]
        assert phases == sorted(phases), f"{side}: phases out of order {phases}"


def test_worker_and_hand_written_loop_train_the_same_model(report: tuple[subprocess.CompletedProcess, dict]) -> None:
    """Same start weights, same batches: after every round the two models still agree (up to the
    last-bit rounding of fused vs for-loop SGD), while training moved them far more than that."""
    for case in ("throughput", "overhead"):
        details = report[1]["details"][case]
        assert details["param_max_abs_moved"] > 1e-3
        assert details["param_max_abs_diff"] < 1e-4 * max(1.0, details["param_max_abs_moved"]), case
