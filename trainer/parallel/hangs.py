"""A hang, turned into one line: which collective at which step did not complete, which ranks never
entered it, on which hosts, and where their code was (or that they did not answer at all).

Each rank keeps a trail in memory (the step it is on and what it is doing) and runs a watchdog
thread that looks at the rendezvous store once a second. The rank whose collective times out
asks every rank, through the store, to write its stacks (``logs/stacks/rank_<r>.txt``, its loader
workers ``rank_<r>_worker_<w>.txt``), dump its flight recorder (trainer/parallel/flight_recorder.py)
and report its trail and innermost frame of user or project code. A rank stuck outside any
collective answers from its watchdog thread (its main thread is blocked), then prints the verdict
and exits; a stopped or dead rank stays silent, and the verdict says so. Every rank that can
prints the same line and exits with :data:`EXIT_HANG`.

Two timeouts, as torchtitan has: ``dist.timeout_s`` for start-up, the first step and whatever
follows rank-0-only work (checkpoints, pictures, validation), ``dist.step_timeout_s`` between
training steps (see :func:`patient`).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import sysconfig
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Iterator

import torch.distributed as dist

from trainer.errors import EXIT_HANG
from trainer.parallel import flight_recorder
from trainer.parallel.distributed import DistEnv

REPORT_WAIT_S = 10.0
"""How long the rank that timed out waits for the others' reports (a watchdog looks every second,
then gives its loader workers a second to write their stacks)."""
WORKER_SIGNAL = signal.SIGRTMIN + 2
"""What asks a loader worker for its stacks (a real-time signal: no stop signal is one)."""
LIBRARY_PATHS = tuple({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
                       sysconfig.get_paths()["platlib"], str(Path(__file__))})
"""Frames under these are not where the user's or the project's code waits."""


class Trail:
    """What this rank is doing: the optimizer step it works towards and the phase of it."""

    PHASES = {"start": "start-up", "data": "waiting for its data of step {step}",
              "step": "the forward, backward and gradient all-reduce of step {step}",
              "agreement": "the stop agreement after step {step}", "checkpoint": "the checkpoint at step {step}",
              "validation": "the validation after step {step}"}

    def __init__(self) -> None:
        self.phase, self.step = "start", 0

    def at(self, phase: str, step: int) -> None:
        self.phase, self.step = phase, step

    def describe(self) -> str:
        return self.PHASES[self.phase].format(step=f"{self.step:,}")


TRAIL = Trail()
STACKS_DIR: Path | None = None  # set in the main process; forked loader workers inherit it
RANK = 0
TIMEOUT_S = 0.0  # the collectives' timeout, as last set (the process group's own until then)


@contextmanager
def patient(env: DistEnv, generous_s: float, steady_s: float) -> Iterator[None]:
    """Collectives inside use the generous timeout (after rank-0-only work or uneven work), those
    after it the steady one."""
    set_timeout(env, generous_s)
    try:
        yield
    finally:
        set_timeout(env, steady_s)


def set_timeout(env: DistEnv, seconds: float) -> None:
    """The timeout of every collective from now on, on both process groups."""
    global TIMEOUT_S
    if env.is_distributed and seconds != TIMEOUT_S:
        for group in (None, env.control):
            dist.set_timeout(timedelta(seconds=seconds), group)
        TIMEOUT_S = seconds


def current_timeout() -> float:
    """The collectives' timeout now (what a collective that failed waited)."""
    return TIMEOUT_S


class Watchdog:
    """The thread that answers a hang report for this rank (see the module's docstring)."""

    def __init__(self, env: DistEnv, run_dir: Path, timeout_s: float) -> None:
        """``timeout_s``: the process groups' timeout, as they were made."""
        global STACKS_DIR, RANK, TIMEOUT_S
        self.env, self.store = env, env.store
        TIMEOUT_S = timeout_s
        STACKS_DIR, RANK = run_dir / "logs" / "stacks", env.rank
        self.handling = threading.Event()  # the main thread itself reports (it timed out)
        self.answered = threading.Lock()
        self.done = False
        self.store.set(f"hang/host/{env.rank}", f"{socket.gethostname()} pid {os.getpid()}")
        flight_recorder.prepare(env.rank)
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        threading.Thread(target=self._watch, name="hang-watchdog", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            try:
                asked = self.store.check(["hang/dump"])
            except Exception:  # the store's host is gone: the main thread's collective will say so
                return
            if asked:
                self.answer()
                if not self.handling.is_set():
                    self._print_verdict_and_exit()
                return

    def answer(self) -> None:
        """Write this rank's stacks (and its loader workers'), report its trail and frame (once)."""
        with self.answered:
            if self.done:
                return
            self.done = True
            assert STACKS_DIR is not None
            STACKS_DIR.mkdir(parents=True, exist_ok=True)
            with open(STACKS_DIR / f"rank_{self.env.rank}.txt", "w") as file:
                faulthandler.dump_traceback(file, all_threads=True)
            frame = innermost_frame(sys._current_frames().get(self._main))
            workers = _loader_workers()
            for pid in workers:
                try:
                    os.kill(pid, WORKER_SIGNAL)
                except OSError:
                    pass
            time.sleep(1.0 if workers else 0.0)
            for path in sorted(STACKS_DIR.glob(f"rank_{self.env.rank}_worker_*.txt")):
                first = path.read_text().partition("\n")[0]
                if first.startswith("innermost: ") and first != "innermost: none":
                    worker = path.stem.rpartition("_")[2]
                    frame = f"{first[len('innermost: '):]} (loader worker {worker})"
            flight_recorder.dump(self.env.rank, self.env.backend == "nccl")
            report = {"trail": TRAIL.describe(), "frame": frame}
            self.store.set(f"hang/report/{self.env.rank}", json.dumps(report))

    def _print_verdict_and_exit(self) -> None:
        """This rank hangs outside any collective: say what the others found, end it and its loader
        workers (one may be the one stuck: nothing else would end it)."""
        deadline = time.monotonic() + REPORT_WAIT_S + 10
        while time.monotonic() < deadline:
            if self.store.check(["hang/verdict"]):
                sys.stderr.write(f"error [rank {self.env.rank}]: {self.store.get('hang/verdict').decode()}\n")
                sys.stderr.flush()
                break
            time.sleep(0.2)
        for pid in _loader_workers():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os._exit(EXIT_HANG)

    def verdict(self, exc: BaseException, timeout_s: float) -> str:
        """Called by a rank whose collective failed: gather the reports and agree on one line."""
        self.handling.set()
        store, world = self.store, self.env.world_size
        mine = TRAIL.describe()
        store.set("hang/dump", "1")
        self.answer()
        deadline = time.monotonic() + REPORT_WAIT_S
        keys = [f"hang/report/{rank}" for rank in range(world)]
        while time.monotonic() < deadline and not all(store.check([key]) for key in keys):
            time.sleep(0.1)
        reports = {rank: json.loads(store.get(key)) for rank, key in enumerate(keys) if store.check([key])}
        parts, named = [], []
        per_node = self.env.topology.local_world_size
        for rank in range(world):
            host = store.get(f"hang/host/{rank}").decode() if store.check([f"hang/host/{rank}"]) else "?"
            where = f"rank {rank} (node {rank // per_node}, {host})"
            if rank not in reports or reports[rank]["trail"] != mine:
                named.append(rank)
            if rank not in reports:
                parts.append(f"{where} did not answer: stopped, dead or cut off from the network")
            elif reports[rank]["trail"] != mine:
                frame = reports[rank]["frame"]
                parts.append(f"{where} never entered it: {reports[rank]['trail']}"
                             + (f", at {frame}" if frame else ""))
        who = "; ".join(parts) or "every rank entered it and still answers (a transient network failure?)"
        prefix = flight_recorder.dump_prefix()
        recorded = flight_recorder.summary(prefix, [self.env.rank, *named], world) if prefix and named else None
        line = (f"hang: {mine} did not complete within {timeout_s:g} s ({_detail(exc)}); {who}; "
                f"stacks in {STACKS_DIR}; " + (f"{recorded}; " if recorded else "")
                + "start the run again: it resumes from its last checkpoint")
        return store.compare_set("hang/verdict", "", line).decode()


def tell_torchrun(verdict: str) -> None:
    """Make ``verdict`` the root cause in torchrun's failure summary (its error file, in the
    format ``torch.distributed.elastic`` reads), instead of the timed-out collective's traceback."""
    if path := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with open(path, "w") as file:
            json.dump({"message": {"message": verdict, "extraInfo": {"py_callstack": verdict,
                                                                     "timestamp": str(int(time.time()))}}}, file)


def innermost_frame(frame: FrameType | None) -> str | None:
    """``path:line in function`` of the innermost frame outside the standard library and installed
    packages, e.g. ``mypkg/data.py:41 in __getitem__``; None if there is none."""
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(LIBRARY_PATHS) and not path.startswith("<"):
            return f"{_short(path)}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return None


def answer_in_worker(worker_id: int) -> None:
    """In a loader worker: write this worker's stacks when its rank's watchdog asks."""
    def dump(signum: int, frame: FrameType | None) -> None:
        if STACKS_DIR is None:
            return
        with open(STACKS_DIR / f"rank_{RANK}_worker_{worker_id}.txt", "w") as file:
            file.write(f"innermost: {innermost_frame(frame) or 'none'}\n")
            file.write("".join(traceback.format_stack(frame)))
            file.flush()
            faulthandler.dump_traceback(file, all_threads=True)

    signal.signal(WORKER_SIGNAL, dump)


def _loader_workers() -> list[int]:
    """This process's child processes (its DataLoader workers)."""
    me, children = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) == me:
                children.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return children


def _short(path: str) -> str:
    cwd = os.getcwd() + os.sep
    return path[len(cwd):] if path.startswith(cwd) else path


def _detail(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first.split("] ")[-1].split(". ")[0]

