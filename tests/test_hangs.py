"""A hang becomes one line: 3 real processes, ``dist.step_timeout_s=15``, rank 2's data set (a user
data set by import path, tests/hanging_data.py) blocking forever in ``__getitem__`` at step 5, or the
whole rank stopped with SIGSTOP there.

Every run goes at once, in one fixture (they mostly wait), and the module's time is about one run's:

| case | launcher | fault | data.num_workers |
|---|---|---|---|
| launcher-main-process | ``python -m launcher --nproc 3`` | blocks | 0 |
| launcher-loader-worker | ``python -m launcher --nproc 3`` | blocks | 2 |
| launcher-stopped | ``python -m launcher --nproc 3`` | SIGSTOP | 0 |
| torchrun-loader-worker | bare torchrun | blocks | 2 |

Each launcher covers a blocking case; the launcher's cases assert everything bare torchrun's would,
the launcher's own last line, exit code and the kill of the stopped rank besides. A stopped rank
under bare torchrun is left to torchrun's own shutdown wait (30 s, documented in the README), which
nothing here could shorten. The stopped run is then resumed on 3 processes (while the others end)
and each sample of its epoch is read once.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import TESTS, child_env, command, last_checkpoint, small_run

from launcher.reaper import HangReaper
from trainer.errors import EXIT_HANG

pytestmark = pytest.mark.slow

STEP_TIMEOUT_S = 15
MARGIN_S = 20
KILL_S = 10  # the launcher ends a rank the verdict names as not answering within this
TRAIN_SIZE, WORLD = 3 * 64, 3
RECORDED = 32  # dist.flight_recorder_entries of launcher-main-process (fewer than its collectives)
CASES = {  # name: (launcher, fault, data.num_workers, the read of rank 2 that hangs: step 5's)
    "launcher-main-process": ("launcher", "block", 0, 40),  # 8 reads a step
    "launcher-loader-worker": ("launcher", "block", 2, 17),  # worker 0 reads steps 1, 3, 5
    "launcher-stopped": ("launcher", "stop", 0, 40),
    "torchrun-loader-worker": ("torchrun", "block", 2, 17),
}


class Run:
    """A started run whose output lines are timed as they arrive."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(argv, cwd=TESTS.parent, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str, str]] = []  # (arrival, stream, line)
        self.ended = 0.0
        self.readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                        for stream, name in ((self.process.stdout, "out"), (self.process.stderr, "err"))]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, name: str) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            self.lines.append((time.time(), name, line.rstrip("\n")))
        self.ended = max(self.ended, time.time())  # every process holding the stream has ended

    def wait(self, timeout: float) -> Run:
        self.process.wait(timeout=timeout)
        for reader in self.readers:
            reader.join()
        return self

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, stream, line in self.lines if stream == "err")

    @property
    def stdout(self) -> str:
        return "\n".join(line for _, stream, line in self.lines if stream == "out")

    def first(self, pattern: str) -> float:
        """When the first stderr line matching ``pattern`` arrived."""
        return next(at for at, stream, line in self.lines if stream == "err" and re.search(pattern, line))


def run_args(tmp: Path, name: str, workers: int) -> list[str]:
    recorder = ["dist.flight_recorder=on", f"dist.flight_recorder_entries={RECORDED}"] \
        if name == "launcher-main-process" else []  # the others: torch's own buffer (dist.flight_recorder=auto)
    return ["--code", str(TESTS), *small_run(tmp, f"log.name={name}", "data.source=hanging_data:build",
                                             f"data.num_workers={workers}", "train.epochs=1", "ckpt.every_steps=2",
                                             f"dist.step_timeout_s={STEP_TIMEOUT_S}", "log.pictures=false", *recorder)]


def start(tmp: Path, name: str, how: str, workers: int, read: int, via: str) -> Run:
    record = tmp / "record" / name
    record.mkdir(parents=True, exist_ok=True)
    faults = dict(HANG_RANK="2", HANG_AT_READ=str(read), HANG_HOW=how, HANG_MARK=str(tmp / f"{name}.mark")) \
        if how else {}
    env = {k: v for k, v in child_env(HANG_RECORD=str(record), **faults).items() if not k.startswith("SLURM_")}
    if via == "launcher":
        argv = [sys.executable, "-m", "launcher", "--nproc", str(WORLD), "--", *run_args(tmp, name, workers)]
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        argv = command(run_args(tmp, name, workers), WORLD)
    return Run(argv, env)


@pytest.fixture(scope="module")
def hung(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each case's finished Run and when its fault happened; "resumed": the stopped run started again."""
    tmp = tmp_path_factory.mktemp("hangs")
    runs = {name: start(tmp, name, how, workers, read, via) for name, (via, how, workers, read) in CASES.items()}
    results: dict = {"tmp": tmp}
    for name in ("launcher-stopped", *[name for name in CASES if name != "launcher-stopped"]):
        run = runs[name].wait(timeout=300)
        mark = tmp / f"{name}.mark"
        assert mark.exists(), f"{name}: the fault never happened\n{run.stdout}\n{run.stderr}"
        results[name] = (run, float(mark.read_text()))
        if name == "launcher-stopped":  # its resume overlaps the others' ends
            results["position"] = last_checkpoint(tmp, name)["position"]
            resumed = start(tmp, name, "", 0, 0, "launcher")
    results["resumed"] = resumed.wait(timeout=300)
    return results


def verdicts(run: Run) -> dict[int, str]:
    found = re.findall(r"^error \[rank (\d)\]: (hang: .*)$", run.stderr, re.M)
    return {int(rank): line for rank, line in found}


def exit_codes(run: Run) -> dict[int, int]:
    """Each failed worker's exit code (-9: killed by SIGKILL), from the launcher's line or torchrun's summary."""
    if line := re.search(r"^launcher: workers that failed: (.*)$", run.stderr, re.M):
        found = re.findall(r"rank (\d+) (?:exit (\d+)|killed by (SIG\w+))", line.group(1))
        return {int(rank): int(code) if code else -signal.Signals[name] for rank, code, name in found}
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", run.stderr)
    return {int(rank): int(code) for rank, code in found}


@pytest.mark.parametrize("case", ["launcher-main-process", "launcher-loader-worker", "torchrun-loader-worker"])
def test_a_rank_stuck_in_its_data_is_named_with_its_frame_and_every_rank_ends(hung: dict, case: str) -> None:
    run, fault = hung[case]
    assert run.ended - fault <= STEP_TIMEOUT_S + MARGIN_S, f"ended {run.ended - fault:.0f} s after the fault"
    lines = verdicts(run)
    assert set(lines) == {0, 1, 2}, run.stderr[-3000:]  # the stuck rank's watchdog answers and prints too
    line = lines[0]
    assert len(set(lines.values())) == 1, "every rank prints the same verdict"
    assert re.search(r"hang: the forward, backward and gradient all-reduce of step 5 did not complete within "
                     rf"{STEP_TIMEOUT_S} s", line), line
    host = socket.gethostname()
    assert f"rank 2 (node 0, {host} pid " in line and "never entered it: waiting for its data of step 5" in line
    assert re.search(r"at tests/hanging_data\.py:\d+ in __getitem__", line), line
    assert ("(loader worker " in line) == ("loader-worker" in case)
    assert "rank 0 (" not in line and "rank 1 (" not in line
    stacks = hung["tmp"] / "runs" / case / "logs" / "stacks"
    assert {p.name for p in stacks.glob("rank_?.txt")} == {"rank_0.txt", "rank_1.txt", "rank_2.txt"}
    assert "__getitem__" in "".join(p.read_text() for p in stacks.glob("rank_2*.txt"))
    assert exit_codes(run) == {0: EXIT_HANG, 1: EXIT_HANG, 2: EXIT_HANG}, run.stderr[-3000:]
    recorded = re.search(r"; flight recorder: (.*) \(dumps: \S+/flight_recorder\); start the run again", line)
    assert recorded and "rank 2" in recorded.group(1), line
    if case != "launcher-main-process":  # torch's own buffer holds the whole run: its analyser matches it all
        assert re.fullmatch(r"torch's analyser: rank 2 never entered gloo:\w+ #\d+ of 0:default_pg",
                            recorded.group(1)), line
    if case.startswith("launcher"):
        assert run.process.returncode == EXIT_HANG
        assert run.stderr.splitlines()[-1] == f"launcher: {line.removeprefix('error [rank 0]: ')}"
    else:
        assert run.process.returncode == 1  # torchrun's own
        assert "hang: " in run.stderr.split("Root Cause")[-1], "torchrun's summary shows the verdict"


def test_the_flight_recorder_keeps_the_configured_entries_and_every_rank_dumps_them(hung: dict) -> None:
    """dist.flight_recorder reaches torch in each real process: its buffer holds exactly that many
    collectives though the run made more."""
    folder = hung["tmp"] / "runs" / "launcher-main-process" / "logs" / "flight_recorder"
    for rank in range(WORLD):
        dump = pickle.loads((folder / f"rank_{rank}").read_bytes())
        entries = dump["entries"]
        assert len(entries) == RECORDED and max(e["record_id"] for e in entries) >= RECORDED, len(entries)
        assert dump["pg_config"]["0"] == {"name": "0", "desc": "default_pg", "ranks": "[0, 1, 2]"}, dump["pg_config"]


def test_a_stopped_rank_is_named_as_not_answering_and_the_launcher_kills_it(hung: dict) -> None:
    run, fault = hung["launcher-stopped"]
    lines = verdicts(run)
    assert set(lines) == {0, 1}, run.stderr[-3000:]
    assert len(set(lines.values())) == 1, lines
    line = lines[0]
    assert "rank 2 (node 0, " in line and "did not answer: stopped, dead or cut off" in line, line
    assert re.search(r"; flight recorder: (.*; )?no dump from rank 2 \(dumps: ", line), line
    for rank in (0, 1):
        printed = run.first(rf"^error \[rank {rank}\]: hang: ")
        assert printed - fault <= STEP_TIMEOUT_S + MARGIN_S, f"rank {rank}: {printed - fault:.0f} s after the fault"
    pid = re.search(r"rank 2 \(node 0, \S+ pid (\d+)\)", line).group(1)
    killed = run.first(rf"^launcher: killed rank 2 \(pid {pid}\), which did not answer")
    assert killed - run.first(r"^error \[rank \d\]: hang: ") <= KILL_S
    assert run.ended - killed <= KILL_S, f"torchrun took {run.ended - killed:.0f} s more"
    assert exit_codes(run) == {0: EXIT_HANG, 1: EXIT_HANG, 2: -9}, run.stderr[-3000:]
    assert run.process.returncode == EXIT_HANG
    assert run.stderr.splitlines()[-1] == f"launcher: {line.removeprefix('error [rank 0]: ')}"


def test_the_stopped_run_resumes_on_3_processes_and_reads_each_sample_once(hung: dict) -> None:
    tmp, resumed = hung["tmp"], hung["resumed"]
    assert resumed.process.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert last_checkpoint(tmp, "launcher-stopped")["epoch"] == 1
    position = hung["position"]  # where the hung run's last checkpoint was
    assert position["epoch"] == 0 and position["consumed"] > 0, position
    record = tmp / "record" / "launcher-stopped"
    pids = {rank: sorted(record.glob(f"rank{rank}_pid*.txt"), key=lambda p: p.stat().st_mtime) for rank in range(3)}
    assert all(len(files) == 2 for files in pids.values()), pids  # the hung run's, then the resumed one's
    before = position["consumed"] // WORLD  # each rank's reads up to the checkpoint (no loader workers: in order)
    hung_reads = {rank: files[0].read_text().split() for rank, files in pids.items()}
    resumed_reads = {rank: files[1].read_text().split() for rank, files in pids.items()}
    assert all(len(reads) == TRAIN_SIZE // WORLD - before for reads in resumed_reads.values()), resumed_reads
    served = [int(i) for rank in range(3) for i in hung_reads[rank][:before] + resumed_reads[rank]]
    assert sorted(served) == list(range(TRAIN_SIZE))


def test_the_launcher_kills_only_its_own_workers_on_its_own_host(tmp_path: Path) -> None:
    """A verdict naming, as not answering, a child of this process (killed), a grandchild and a
    child on another host (both left alone): the reaper of launcher/reaper.py, in this process."""
    error_file = tmp_path / "error.json"
    env = {**os.environ, "TORCHELASTIC_ERROR_FILE": str(error_file)}
    child = subprocess.Popen(["sleep", "60"], env=env)
    elsewhere = subprocess.Popen(["sleep", "60"])
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    grandchild = int(parent.stdout.readline())
    host = socket.gethostname()
    verdict = (f"hang: ...; rank 2 (node 0, {host} pid {child.pid}) did not answer: stopped; rank 3 (node 0, {host} "
               f"pid {grandchild}) did not answer: stopped; rank 4 (node 1, not-{host} pid {elsewhere.pid}) did not "
               "answer: stopped; stacks in ...")
    reaper = HangReaper()
    reaper.start()
    try:
        time.sleep(1.0)  # the reaper reads the child's error file path while it runs
        error_file.write_text(json.dumps({"message": {"message": verdict, "extraInfo": {}}}))
        assert child.wait(timeout=10) == -signal.SIGKILL
        time.sleep(1.0)
        assert elsewhere.poll() is None and parent.poll() is None
        os.kill(grandchild, 0)  # still there
    finally:
        reaper.stop()
        for process in (elsewhere, parent):
            process.kill()
            process.wait()
        os.kill(grandchild, signal.SIGKILL)
