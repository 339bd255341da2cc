"""Checkpoints that lose nothing: exact resume after SIGTERM and SIGKILL, restarts, retention.

All runs are real 2-process torchrun jobs on CPU (gloo).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
pytestmark = pytest.mark.slow


def run_args(tmp: Path, name: str, *extra: str) -> list[str]:
    return [f"log.output_dir={tmp / 'runs'}", f"log.name={name}", f"data.cache_dir={tmp / 'cache'}",
            "data.synthetic_classes=3", "data.synthetic_train_per_class=64", "data.synthetic_val_per_class=10",
            "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "train.epochs=3",
            "ckpt.every_steps=4", "log.progress_bar=off", "dist.timeout_s=60", *extra]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def torchrun(tmp: Path, name: str, *extra: str, script: list[str] | None = None,
             launcher: list[str] = TORCHRUN) -> subprocess.CompletedProcess:
    cmd = launcher + (script or ["-m", "trainer"]) + run_args(tmp, name, *extra)
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)


def start(tmp: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen(TORCHRUN + ["-m", "trainer"] + run_args(tmp, name), cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"run ended before {path.name} appeared:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def final_state(tmp: Path, name: str) -> dict:
    return torch.load(tmp / "runs" / name / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def math_history(state: dict) -> list[dict]:
    """The per-epoch metrics that must match exactly (timings naturally differ)."""
    timing = ("images_per_s", "data_wait", "time_s", "peak_mem_mb")
    return [{k: v for k, v in record.items() if not k.endswith(timing)} for record in state["history"]]


def assert_same_run(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), f"weights differ at {key}"
    assert math_history(a) == math_history(b)


def resume_and_compare(tmp: Path, name: str, expected: dict) -> None:
    """Run the interrupted job again: it must resume and end exactly like the reference run."""
    resumed = torchrun(tmp, name)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    assert_same_run(final_state(tmp, name), expected)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("resume")
    result = torchrun(tmp, "uninterrupted")
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp, final_state(tmp, "uninterrupted")


def test_sigterm_mid_epoch_then_resume_is_bitwise_identical(reference: tuple[Path, dict]) -> None:
    tmp, expected = reference
    run = start(tmp, "sigterm")
    wait_for(tmp / "runs" / "sigterm" / "checkpoints" / "step_000000004.pt", run)
    os.kill(run.pid, signal.SIGTERM)  # torchrun's agent forwards SIGTERM to both workers
    output = run.communicate(timeout=120)[0]
    assert "checkpoint saved, exit code 3" in output
    stopped = final_state(tmp, "sigterm")
    assert 0 < stopped["global_step"] < expected["global_step"]
    resume_and_compare(tmp, "sigterm", expected)


def test_sigkill_after_a_checkpoint_then_resume_is_bitwise_identical(reference: tuple[Path, dict]) -> None:
    tmp, expected = reference
    run = start(tmp, "sigkill")
    wait_for(tmp / "runs" / "sigkill" / "checkpoints" / "step_000000016.pt", run)
    os.killpg(run.pid, signal.SIGKILL)  # the agent and both workers, no chance to save
    run.communicate(timeout=60)
    resume_and_compare(tmp, "sigkill", expected)


def test_max_restarts_recovers_a_crashed_worker(reference: tuple[Path, dict]) -> None:
    tmp, expected = reference
    launcher = TORCHRUN[:3] + ["--max-restarts=1"] + TORCHRUN[3:]
    result = torchrun(tmp, "restarted", script=[str(REPO / "tests" / "crash_once_worker.py")], launcher=launcher)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "rank 1 dies at step" in output and "resumed from" in output
    assert_same_run(final_state(tmp, "restarted"), expected)


def test_keep_last_and_best_tracking(reference: tuple[Path, dict]) -> None:
    tmp, _ = reference
    result = torchrun(tmp, "retention", "ckpt.keep_last=2", "ckpt.metric=val/loss", "ckpt.mode=min")
    assert result.returncode == 0, result.stdout + result.stderr
    folder = tmp / "runs" / "retention" / "checkpoints"
    steps = sorted(p.name for p in folder.glob("step_*.pt"))
    last = final_state(tmp, "retention")
    assert steps == [f"step_{last['global_step'] - 4:09d}.pt", f"step_{last['global_step']:09d}.pt"]
    best = torch.load(folder / "best.pt", map_location="cpu", weights_only=True)
    losses = [record["val/loss"] for record in last["history"]]
    assert best["best"] == min(losses) == last["best"]
    assert best["epoch"] == losses.index(min(losses)) + 1
    assert [json.loads(line)["val/loss"] for line in
            (tmp / "runs" / "retention" / "metrics.jsonl").read_text().splitlines()] == losses


SLOW_WRITER = """
import os, sys, time, torch
from pathlib import Path
from trainer import checkpoint
def stalled_fsync(fd):
    print("writing", flush=True)
    time.sleep(60)
os.fsync = stalled_fsync
checkpoint.save_atomic({"model": {"w": torch.full((1000,), 2.0)}}, Path(sys.argv[1]))
"""


def test_sigkill_while_writing_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    from trainer import checkpoint

    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save_atomic({"model": {"w": torch.ones(1000)}}, path)
    before = path.read_bytes()
    writer = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(path)], cwd=REPO, env=child_env(),
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"  # the new bytes are on disk, not yet renamed
    temp_files = [p for p in path.parent.iterdir() if p.name != "last.pt"]
    assert temp_files and temp_files[0].stat().st_size > 0
    writer.kill()
    writer.wait(timeout=30)
    assert path.read_bytes() == before
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(1000))
