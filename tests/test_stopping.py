"""Stopping where it is least convenient: during validation under torchrun with 2 processes, and
with steps so short that polling every step would cost more than the steps."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.parallel import distributed

REPO = Path(__file__).resolve().parents[1]


SLOW_VALIDATION = """
import time
import torch
from torch.utils.data import Dataset


class Images(Dataset):
    def __init__(self, size, seconds_per_image):
        self.size, self.seconds_per_image = size, seconds_per_image

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        time.sleep(self.seconds_per_image)
        return torch.rand(3, 16, 16), index % 3


def build(cfg):
    return Images(24, 0.0), Images(1200, 0.05), ["a", "b", "c"]
"""


@pytest.mark.slow
def test_sigterm_during_validation_stops_at_once_with_one_checkpoint(tmp_path: Path) -> None:
    """Validation is slow here (50 ms per image, one image per batch, 600 per rank: 30 s); a SIGTERM
    in its middle ends the job within seconds, with one checkpoint at the end of the epoch's training."""
    (tmp_path / "slowval.py").write_text(SLOW_VALIDATION)
    args = ["--code", str(tmp_path), f"log.output_dir={tmp_path}", "log.name=val", "model.name=smallcnn",
            "data.source=slowval:build", "data.image_size=16", "data.batch_size=4", "data.val_batch_size=1",
            "data.num_workers=0", "train.epochs=1", "log.progress_bar=off", "log.debug=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "trainer", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert job.stdout is not None
    output = []
    for line in job.stdout:
        output.append(line)
        if "validating 1200 samples" in line:
            break
    time.sleep(2)  # well into validation
    signalled = time.monotonic()
    job.send_signal(signal.SIGTERM)
    output += job.communicate(timeout=120)[0].splitlines(keepends=True)
    took = time.monotonic() - signalled
    text = "".join(output)
    assert "stopped by SIGTERM at epoch 1, 24 of 24 samples" in text, text
    assert took < 15, f"{took:.1f} s after SIGTERM: validation was not cut short\n{text}"
    steps = sorted((tmp_path / "val" / "checkpoints").glob("step_*.pt"))
    assert len(steps) == 1, "one save, not two"
    state = torch.load(steps[0], weights_only=True)
    assert state["position"] == {"epoch": 0, "consumed": 24} and state["history"] == []
    assert not (tmp_path / "val" / "metrics.jsonl").exists() or not (tmp_path / "val" / "metrics.jsonl").read_text()


def poll_ranks(rank: int, port: int, out: str, step_s: float) -> None:
    """Poll like the training loop with steps of ``step_s``; rank 1 gets a stop signal at step 30."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        env = distributed.DistEnv(distributed.Topology(rank, rank, 2, 2, "test"), torch.device("cpu"), "gloo",
                                  dist.new_group(backend="gloo"))
        agreement = distributed.LaggedAgreement(env)
        stopped_at, intervals = None, []
        for step in range(1, 2000):
            time.sleep(step_s)
            intervals.append(agreement.every)
            if agreement.poll([rank == 1 and step >= 30])[0]:
                stopped_at = step
                break
        agreement.settle(1)
        Path(out, f"{rank}.json").write_text(json.dumps({"stopped_at": stopped_at, "every": max(intervals)}))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("step_s", [0.0, 0.06])
def test_ranks_stop_together_polling_less_often_only_for_tiny_steps(tmp_path: Path, step_s: float) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks = mp.start_processes(poll_ranks, args=(port, str(tmp_path), step_s), nprocs=2, join=False,
                               start_method="fork")
    deadline = time.monotonic() + 60
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 60 s")
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0]["stopped_at"] == results[1]["stopped_at"] is not None  # the same step on both ranks
    every = results[0]["every"]
    if step_s:  # 60 ms steps: a poll is under 1% of a step, so every step is polled; stop one step late
        assert every == 1 and results[0]["stopped_at"] == 31
    else:  # back-to-back steps: fewer polls, and the stop comes within two intervals
        assert every > 1 and 30 < results[0]["stopped_at"] <= 30 + 2 * every


WARNED_RANK_1 = """
import os
import re
import signal

import torch
from torch.utils.data import Dataset


class Images(Dataset):
    def __init__(self, size):
        self.size, self.reads = size, 0

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        self.reads += 1
        if self.reads == 20 and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning, reaching rank 1 only (so far)
        return torch.rand(3, 16, 16), index % 3


def build(cfg):
    return Images(400), Images(8), ["a", "b", "c"]
"""


@pytest.mark.slow
def test_a_warning_on_another_rank_still_makes_rank_0_requeue_the_job(tmp_path: Path) -> None:
    """On several nodes the warning reaches each node's workers at its own time; the agreed stop may
    come before rank 0 has its own copy. Rank 0 must still ask SLURM for the requeue."""
    (tmp_path / "warned.py").write_text(WARNED_RANK_1)
    args = ["--code", str(tmp_path), f"log.output_dir={tmp_path}", "log.name=warned", "model.name=smallcnn",
            "data.source=warned:build", "data.image_size=16", "data.batch_size=4", "data.num_workers=0",
            "train.epochs=1", "log.progress_bar=off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "65000001"}
    env.pop("SLURM_RESTART_COUNT", None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "trainer", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    output = result.stdout + result.stderr
    assert "stopped by a signal on another rank" in output, output  # rank 0 never got SIGUSR1 itself
    # No SLURM job 65000001 exists here: scontrol refuses it, or is not installed. Rank 0 tried.
    assert re.search(r"requeueing SLURM job 65000001", output), output
