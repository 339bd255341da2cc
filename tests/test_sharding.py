"""FSDP2 (``dist.strategy=fsdp``) on real gloo process groups: the same training as DDP, a
fraction of the memory per rank, and checkpoints that resume at any world size.

Every run is the user's own model (``sharded_net.py``: three residual ``Block``s with BatchNorm)
from one shared initial weights file, through ``recording_worker.py`` so that the tests can see
which samples each rank served.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import last_checkpoint, metrics_lines, run_dir
from sharded_net import build
from test_resume import recorded, recorded_run

from trainer import config
from trainer.errors import ConfigError

pytestmark = pytest.mark.slow

MODEL = "sharded_net:build"
TRAIN_SIZE, EPOCHS = 3 * 64, 2
PLAIN = ("train.ema_decay=0.9",)
HARDER = ("train.grad_accum_steps=2", "train.clip_grad_norm=0.5", "train.epochs=1", "optim.lr=0.02")
"""Clipping sums the squared norms in another order under FSDP (shard by shard): the two runs
start apart by rounding (without clipping they are bitwise equal), and training amplifies it, the
more the higher the learning rate and the longer the run."""


def sharded_run(tmp: Path, name: str, strategy: str, *extra: str, nproc: int = 2, **faults: str) -> None:
    """A 2-epoch recorded run of the shared model from the shared initial weights; it must finish
    (or, with ``STOP_AT_STEP``, stop)."""
    result = recorded_run(tmp, name, f"model.name={MODEL}", f"model.weights={tmp / 'initial.pt'}",
                          f"dist.strategy={strategy}", f"train.epochs={EPOCHS}", *extra, nproc=nproc, **faults)
    stopped = "STOP_AT_STEP" in faults
    assert (result.returncode != 0) == stopped, result.stdout + result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DDP and FSDP, each plain (with an EMA) and with accumulation, clipping and activation
    checkpointing; HSDP."""
    tmp = tmp_path_factory.mktemp("sharding")
    torch.manual_seed(1)
    torch.save(build(3).state_dict(), tmp / "initial.pt")
    sharded_run(tmp, "ddp", "ddp", *PLAIN)
    sharded_run(tmp, "fsdp", "fsdp", *PLAIN)
    sharded_run(tmp, "ddp-harder", "ddp", *HARDER, "train.activation_checkpointing=full")
    sharded_run(tmp, "fsdp-harder", "fsdp", *HARDER, "train.activation_checkpointing=selective")
    # HSDP on a 2-D mesh: 2 replicas of 1 shard (hosts x processes per host, as on 2 one-GPU nodes)
    sharded_run(tmp, "hsdp-harder", "hsdp", *HARDER, "dist.hsdp_shard_size=1", "train.activation_checkpointing=full")
    return tmp


def assert_close_weights(a: dict, b: dict, rel: float = 1e-5) -> None:
    """Equal integer tensors, and floating-point ones within ``rel`` of the model's norm."""
    assert a.keys() == b.keys()
    floats = [key for key, tensor in a.items() if tensor.is_floating_point()]
    for key in set(a) - set(floats):
        assert torch.equal(a[key], b[key]), f"{key} differs"
    mine, theirs = (torch.cat([state[key].flatten() for key in floats]) for state in (a, b))
    assert (mine - theirs).norm() <= rel * mine.norm()


@pytest.mark.parametrize("pair", [("ddp", "fsdp"), ("ddp-harder", "fsdp-harder"), ("ddp-harder", "hsdp-harder")],
                         ids=["plain", "accumulation-clipping-checkpointing", "hsdp"])
def test_sharded_runs_train_the_same_weights_as_ddp(runs: Path, pair: tuple[str, str]) -> None:
    ddp, fsdp = (last_checkpoint(runs, name) for name in pair)
    assert ddp["global_step"] == fsdp["global_step"] > 0
    assert_close_weights(ddp["model"], fsdp["model"])
    if ddp["step"]["ema"] is not None:  # the sharded EMA averaged the same weights
        assert_close_weights(ddp["step"]["ema"]["model"], fsdp["step"]["ema"]["model"])
        assert ddp["history"][-1]["val_ema/top1"] == fsdp["history"][-1]["val_ema/top1"]
    # the optimizer state is saved in one format whatever the strategy: any run resumes under the other
    assert ddp["optimizer"]["state"].keys() == fsdp["optimizer"]["state"].keys()
    assert_close_weights({str(i): s["momentum_buffer"] for i, s in ddp["optimizer"]["state"].items()},
                         {str(i): s["momentum_buffer"] for i, s in fsdp["optimizer"]["state"].items()}, rel=1e-4)


def memory(tmp: Path, name: str) -> float:
    """Parameters + optimizer state held by rank 0 at the last epoch's end, in MB."""
    last = metrics_lines(tmp, name)[-1]
    return last["memory/parameters_mb"] + last["memory/optimizer_mb"]


def test_fsdp_holds_a_world_size_fraction_of_the_training_state(runs: Path) -> None:
    assert memory(runs, "fsdp") == pytest.approx(memory(runs, "ddp") / 2, rel=0.05)
    log = (run_dir(runs, "fsdp") / "logs" / "rank_0.log").read_text()
    assert "(gloo) | fsdp: " in log and "MB of parameters" in log


@pytest.fixture(scope="module")
def stopped(runs: Path) -> dict:
    """An FSDP run stopped by SIGTERM in the middle of its second epoch."""
    sharded_run(runs, "stopped", "fsdp", *PLAIN, STOP_AT_STEP="15")
    state = last_checkpoint(runs, "stopped")
    assert state["position"]["epoch"] == 1 and state["position"]["consumed"] > 0
    return state


def resume_copy(tmp: Path, name: str, nproc: int) -> None:
    """Resume a copy of the stopped run (its run directory and its record) on ``nproc`` processes."""
    shutil.copytree(run_dir(tmp, "stopped"), run_dir(tmp, name))
    shutil.copytree(tmp / "record" / "stopped", tmp / "record" / name)
    sharded_run(tmp, name, "fsdp", *PLAIN, nproc=nproc)


def test_fsdp_resume_on_two_processes_is_bitwise_identical(runs: Path, stopped: dict) -> None:
    resume_copy(runs, "resumed-2", 2)
    resumed, uninterrupted = last_checkpoint(runs, "resumed-2"), last_checkpoint(runs, "fsdp")
    for key, tensor in uninterrupted["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
    for key, tensor in uninterrupted["step"]["ema"]["model"].items():
        assert torch.equal(tensor, resumed["step"]["ema"]["model"][key]), key


@pytest.mark.parametrize("nproc", [3, 1])
def test_fsdp_resume_on_another_world_size_sees_each_sample_once(runs: Path, stopped: dict, nproc: int) -> None:
    name = f"resumed-{nproc}"
    resume_copy(runs, name, nproc)
    served = Counter((s["epoch"], s["index"]) for s in recorded(runs, name, "served") if s["size"] == TRAIN_SIZE)
    for epoch in range(EPOCHS):
        seen = sorted(i for (e, i), count in served.items() if e == epoch for _ in range(count))
        assert seen == list(range(TRAIN_SIZE)), f"epoch {epoch + 1} missed or repeated samples"
    final = last_checkpoint(runs, name)
    assert final["epoch"] == EPOCHS and final["world_size"] == nproc
    # the learning rate is the same function of progress as in the uninterrupted run
    reference = {round(s["start"], 12): s["lr"] for s in recorded(runs, "fsdp", "steps", 0)}
    common = [(s["lr"], reference[round(s["start"], 12)]) for s in recorded(runs, name, "steps", 0)
              if round(s["start"], 12) in reference]
    assert len(common) >= 4 and all(abs(a - b) <= 1e-9 for a, b in common)
    if nproc == 3:  # a third of the state per rank
        assert memory(runs, name) == pytest.approx(memory(runs, "ddp") / 3, rel=0.1)


@pytest.mark.parametrize("key", ["model.compile=true", "log.graph=true", "log.histogram_every_epochs=1"])
def test_what_fsdp_does_not_do_yet_is_refused_in_one_line(key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config.load(overrides=["dist.strategy=fsdp", key])
    assert "dist.strategy=fsdp" in str(refused.value) and "\n" not in str(refused.value)
