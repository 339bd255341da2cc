"""A hang becomes one line: 3 real processes under bare torchrun, rank 2's data set blocking forever
(in the main process, or in a loader worker) or the whole rank stopped with SIGSTOP.

The three faulty runs go at once (they mostly wait): each must end within ``dist.step_timeout_s``
plus 20 s of the fault (plus torchrun's own 30 s shutdown wait for a stopped rank), every rank that
can prints the verdict naming the collective, the step, rank 2, its host and where its code was,
and ``logs/stacks/`` holds the stacks.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers import TESTS, child_env, command, small_run

pytestmark = pytest.mark.slow

STEP_TIMEOUT_S = 15
MARGIN_S = 20
TORCHRUN_SHUTDOWN_S = 30  # torchrun's wait before it SIGKILLs a worker that ignores SIGTERM (a stopped one)
CASES = {"main-process": ("block", "0"), "loader-worker": ("block", "2"), "stopped": ("stop", "0")}


def run_args(tmp: Path, name: str, workers: str) -> list[str]:
    return ["--code", str(TESTS), *small_run(tmp, f"log.name={name}", "data.source=hanging_data:build",
                                             f"data.num_workers={workers}", "train.epochs=2", "ckpt.every_steps=2",
                                             f"dist.step_timeout_s={STEP_TIMEOUT_S}", "log.pictures=false")]


@pytest.fixture(scope="module")
def hung(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, float, float]]:
    """Each case: its torchrun's result, when the fault happened, when torchrun ended."""
    tmp = tmp_path_factory.mktemp("hangs")
    started = {}
    for name, (how, workers) in CASES.items():
        env = child_env(HANG_RANK="2", HANG_AT_READ="40", HANG_HOW=how, HANG_MARK=str(tmp / f"{name}.mark"))
        started[name] = subprocess.Popen(command(run_args(tmp, name, workers), 3), cwd=TESTS.parent, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=300)
        ended = time.time()
        mark = tmp / f"{name}.mark"
        assert mark.exists(), f"{name}: the fault never happened\n{out}\n{err}"
        results[name] = (subprocess.CompletedProcess(process.args, process.returncode, out, err),
                         float(mark.read_text()), ended)
    results["tmp"] = tmp  # type: ignore[assignment]
    return results


def verdicts(result: subprocess.CompletedProcess) -> dict[int, str]:
    found = re.findall(r"^error \[rank (\d)\]: (hang: .*)$", result.stderr, re.M)
    return {int(rank): line for rank, line in found}


@pytest.mark.parametrize("case", ["main-process", "loader-worker"])
def test_a_rank_stuck_in_its_data_is_named_with_its_frame_and_every_rank_ends(hung: dict, case: str) -> None:
    result, fault, ended = hung[case]
    assert result.returncode != 0
    assert ended - fault <= STEP_TIMEOUT_S + MARGIN_S, f"ended {ended - fault:.0f} s after the fault"
    lines = verdicts(result)
    assert set(lines) == {0, 1, 2}, result.stderr[-3000:]  # the stuck rank's watchdog answers and prints too
    line = lines[0]
    assert len(set(lines.values())) == 1, "every rank prints the same verdict"
    assert re.search(r"hang: the forward, backward and gradient all-reduce of step \d+ did not complete within "
                     rf"{STEP_TIMEOUT_S} s", line), line
    host = socket.gethostname()
    assert f"rank 2 (node 0, {host} pid " in line and "never entered it: waiting for its data of step" in line
    assert re.search(r"at tests/hanging_data\.py:\d+ in __getitem__", line), line
    assert ("(loader worker " in line) == (case == "loader-worker")
    assert "rank 0 (" not in line and "rank 1 (" not in line
    stacks = hung["tmp"] / "runs" / case / "logs" / "stacks"
    assert {p.name for p in stacks.glob("rank_?.txt")} == {"rank_0.txt", "rank_1.txt", "rank_2.txt"}
    assert "__getitem__" in "".join(p.read_text() for p in stacks.glob("rank_2*.txt"))
    assert re.findall(r"exitcode\s*: (\d+)", result.stderr) and \
        set(re.findall(r"exitcode\s*: (\d+)", result.stderr)) == {"4"}, "every rank exits with EXIT_HANG"
    assert "hang: " in result.stderr.split("Root Cause")[-1], "torchrun's summary shows the verdict"


def test_a_stopped_rank_is_named_as_not_answering(hung: dict) -> None:
    result, fault, ended = hung["stopped"]
    assert ended - fault <= STEP_TIMEOUT_S + MARGIN_S + TORCHRUN_SHUTDOWN_S, f"{ended - fault:.0f} s"
    lines = verdicts(result)
    assert 0 in lines and 2 not in lines, result.stderr[-3000:]
    assert all("rank 2 (node 0, " in line and "did not answer: stopped, dead or cut off" in line
               for line in lines.values()), lines


def test_a_hung_run_resumes_and_finishes(hung: dict) -> None:
    tmp = hung["tmp"]
    result = subprocess.run(command(run_args(tmp, "main-process", "0"), 3), cwd=TESTS.parent, env=child_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
