"""Running the CLI on bad input and checking the refusal: the exit code, exactly one ``error:``
line on stderr (no traceback), and the watched trees byte-identical with the same mtimes."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO

PARALLEL = 4
TIMEOUT_S = 300

_SCRUB = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
          "TRAINER_DEBUG", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE",
          "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE")


# ------------------------------------------------------------------------------------------ helpers

def trainer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without any job topology (cases set their own), one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run_trainer(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT_S, env=trainer_env(env))


Snapshot = dict[str, tuple[Any, ...]]


def snapshot(*paths: Path, dir_mtimes: bool = True) -> Snapshot:
    """Every file under ``paths`` with its size, mtime and SHA-256; every folder (with its mtime).

    A folder's mtime changes when an entry is created, renamed or deleted in it, so comparing two
    snapshots also catches files that were added and removed again.
    """
    out: Snapshot = {}
    for root in paths:
        if not os.path.lexists(root):
            out[str(root)] = ("absent",)
            continue
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            st = path.lstat()
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                out[str(path)] = ("dir", st.st_mtime_ns if dir_mtimes else None)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path)] = ("file", st.st_size, st.st_mtime_ns, digest)
    return out


def snapshot_diff(before: Snapshot, after: Snapshot) -> list[str]:
    changes = [f"removed {p}" for p in before.keys() - after.keys()]
    changes += [f"added {p}" for p in after.keys() - before.keys()]
    changes += [f"changed {p}: {before[p]} -> {after[p]}" for p in before.keys() & after.keys()
                if before[p] != after[p]]
    return sorted(changes)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error: ...`` line on stderr (asserting there is exactly one, and no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr[-4000:]}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@dataclass(frozen=True)
class Case:
    """One invocation: its arguments, the exit code and substrings its error line must contain,
    and the trees it must leave untouched."""

    name: str
    args: tuple[str, ...]
    expect: tuple[str, ...] = ()
    watch: tuple[Path, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2


@dataclass
class Outcome:
    case: Case
    proc: subprocess.CompletedProcess
    before: Snapshot
    after: Snapshot


def run_cases(cases: list[Case]) -> dict[str, Outcome]:
    """Run the cases concurrently, each between a snapshot of its watched trees before and after."""
    def one(case: Case) -> Outcome:
        before = snapshot(*case.watch)
        proc = run_trainer(list(case.args), case.env)
        return Outcome(case, proc, before, snapshot(*case.watch))

    with ThreadPoolExecutor(PARALLEL) as pool:
        return {o.case.name: o for o in pool.map(one, cases)}


def check_refused(outcome: Outcome) -> str:
    """Exit code, exactly one actionable line, the expected words, nothing touched. Returns the line."""
    case, proc = outcome.case, outcome.proc
    assert proc.returncode == case.code, (
        f"{case.name}: exit {proc.returncode}, expected {case.code}\nstderr:\n{proc.stderr[-4000:]}")
    line = error_line(proc)
    for word in case.expect:
        assert word in line, f"{case.name}: {word!r} not in {line!r}"
    changes = snapshot_diff(outcome.before, outcome.after)
    assert not changes, f"{case.name} modified what it must leave untouched:\n" + "\n".join(changes)
    return line


@contextmanager
def tmpfs(mountpoint: Path, options: str) -> Iterator[Path]:
    """Mount a tmpfs (needs root / CAP_SYS_ADMIN; skips the test otherwise) and unmount it after."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot create a small or read-only filesystem")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a run directory (contents and mtimes) for a case that might damage it."""
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


def make_existing_run(run_dir: Path) -> Path:
    """A stand-in for a previous run's directory (for cases refused before anything is read)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "logs").mkdir()
    (run_dir / "config.yaml").write_text("# the config of a previous run\n")
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (run_dir / "logs" / "rank_0.log").write_text("previous log\n")
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"previous checkpoint bytes")
    return run_dir
