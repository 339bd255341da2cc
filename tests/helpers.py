"""What the tests share: the repository path, a small real run's arguments, and running the CLI
(plain python or torchrun, waited for or in the background)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def torchrun(nproc: int, *options: str) -> list[str]:
    """The torchrun command line for ``nproc`` local processes (rendezvous on a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *options]


def child_env(**extra: str) -> dict[str, str]:
    """This environment, one thread per process (2-core CI machines), and the checkout importable."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""),
            **extra}


def small_run(tmp: Path, *extra: str, train_per_class: int = 64, val_per_class: int = 10, image_size: int = 16,
              batch_size: int = 8) -> list[str]:
    """Overrides for a small, fast real run under ``tmp`` (3 synthetic classes, no loader workers);
    ``extra`` (e.g. ``log.name=...``) comes last, so it wins."""
    return [f"log.output_dir={tmp / 'runs'}", f"data.cache_dir={tmp / 'cache'}", "data.synthetic_classes=3",
            f"data.synthetic_train_per_class={train_per_class}", f"data.synthetic_val_per_class={val_per_class}",
            f"data.image_size={image_size}", f"data.batch_size={batch_size}", "data.num_workers=0",
            "log.progress_bar=off", "dist.timeout_s=60", *extra]


def command(args: list[str], nproc: int = 1, module: str = "trainer", script: Path | None = None,
            launcher: list[str] | None = None) -> list[str]:
    """``python -m module args`` (or ``script``), under torchrun when ``nproc`` > 1 or ``launcher`` is given."""
    target = [str(script)] if script else ["-m", module]
    front = launcher or (torchrun(nproc) if nproc > 1 else [sys.executable])
    return [*front, *target, *args]


def run(args: list[str], nproc: int = 1, module: str = "trainer", script: Path | None = None,
        launcher: list[str] | None = None, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI to its end, capturing its output."""
    return subprocess.run(command(args, nproc, module, script, launcher), cwd=REPO, env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout)


def start(args: list[str], nproc: int = 1, script: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the CLI in its own session (so a test can signal its whole process group)."""
    return subprocess.Popen(command(args, nproc, script=script), cwd=REPO, env=env or child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``path`` exists, failing early if ``process`` ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"run ended before {path.name} appeared:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def run_dir(tmp: Path, name: str) -> Path:
    return tmp / "runs" / name


def last_checkpoint(tmp: Path, name: str) -> dict[str, Any]:
    return torch.load(run_dir(tmp, name) / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def metrics_lines(tmp: Path, name: str) -> list[dict[str, Any]]:
    """The run's metrics.jsonl, one record per line."""
    return [json.loads(line) for line in (run_dir(tmp, name) / "metrics.jsonl").read_text().splitlines()]
