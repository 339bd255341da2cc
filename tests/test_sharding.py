"""FSDP2 (``dist.strategy=fsdp``) on real gloo process groups: the same training as DDP, a
fraction of the memory per rank, and sharded (DCP) checkpoints that resume at any world size.

Every run is the user's own model (``sharded_net.py``: three residual ``Block``s with BatchNorm)
from one shared initial weights file, through ``recording_worker.py`` so that the tests can see
which samples each rank served. The fsdp runs write DCP folders (``ckpt.format=auto``), read
here whole (as the tools read them) by :func:`last_checkpoint`.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import TESTS, metrics_lines, run, run_dir
from sharded_net import build
from test_resume import recorded, recorded_run

from trainer import checkpoint, config
from trainer.checkpoint import sharded
from trainer.errors import CheckpointError, ConfigError
from trainer.models import find_blocks
from trainer.parallel import distributed
from trainer.parallel.sharded import FullyShardedParallel

pytestmark = pytest.mark.slow

MODEL = "sharded_net:build"
TRAIN_SIZE, EPOCHS = 3 * 64, 2
CALM = ("optim.lr=0.02",)
"""A rate at which this small model, with the mixing of test_resume's runs, trains smoothly: at
0.1, chaotic training turns the strategies' different summation orders (1e-7) into 1e-3 apart."""
PLAIN = ("train.ema_decay=0.9",)
HARDER = ("train.grad_accum_steps=2", "train.clip_grad_norm=0.5", "train.epochs=1", "optim.lr=0.02")
"""Clipping sums the squared norms in another order under FSDP (shard by shard): the two runs
start apart by rounding (without clipping they are bitwise equal), and training amplifies it, the
more the higher the learning rate and the longer the run."""


def sharded_run(tmp: Path, name: str, strategy: str, *extra: str, nproc: int = 2, **faults: str) -> str:
    """A 2-epoch recorded run of the shared model from the shared initial weights; it must finish
    (or, with ``STOP_AT_STEP``, stop). Returns its output."""
    result = recorded_run(tmp, name, f"model.name={MODEL}", f"model.weights={tmp / 'initial.pt'}",
                          f"dist.strategy={strategy}", f"train.epochs={EPOCHS}", *CALM, *extra, nproc=nproc,
                          **faults)
    stopped = "STOP_AT_STEP" in faults
    assert (result.returncode != 0) == stopped, result.stdout + result.stderr
    return result.stdout + result.stderr


def last_checkpoint(tmp: Path, name: str) -> dict:
    """The run's newest checkpoint, whole (a DCP folder assembled in the single-file form)."""
    latest = checkpoint.latest(run_dir(tmp, name))
    assert latest is not None
    return checkpoint.load(latest)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DDP and FSDP, each plain (with an EMA) and with accumulation, clipping and activation
    checkpointing (FSDP's with channels_last inputs); HSDP."""
    tmp = tmp_path_factory.mktemp("sharding")
    torch.manual_seed(1)
    torch.save(build(3).state_dict(), tmp / "initial.pt")
    sharded_run(tmp, "ddp", "ddp", *PLAIN)
    sharded_run(tmp, "fsdp", "fsdp", *PLAIN)
    sharded_run(tmp, "ddp-harder", "ddp", *HARDER, "train.activation_checkpointing=full")
    sharded_run(tmp, "fsdp-harder", "fsdp", *HARDER, "train.activation_checkpointing=selective",
                "model.channels_last=true")  # FSDP takes contiguous parameters: the layout is the inputs
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
    # (momentum sums every step's gradients, and with them every step's rounding: a looser bound)
    assert ddp["optimizer"]["state"].keys() == fsdp["optimizer"]["state"].keys()
    assert_close_weights({str(i): s["momentum_buffer"] for i, s in ddp["optimizer"]["state"].items()},
                         {str(i): s["momentum_buffer"] for i, s in fsdp["optimizer"]["state"].items()}, rel=1e-3)


def memory(tmp: Path, name: str) -> float:
    """Parameters + optimizer state held by rank 0 at the last epoch's end, in MB."""
    last = metrics_lines(tmp, name)[-1]
    return last["memory/parameters_mb"] + last["memory/optimizer_mb"]


def test_fsdp_holds_a_world_size_fraction_of_the_training_state(runs: Path) -> None:
    """From the start: the model is built without its parameters' memory, and each rank reads its
    slices of the shared initial weights (the equality above proves the sharded step, not a copy)."""
    assert memory(runs, "fsdp") == pytest.approx(memory(runs, "ddp") / 2, rel=0.05)
    log = (run_dir(runs, "fsdp") / "logs" / "rank_0.log").read_text()
    assert "(gloo) | fsdp: " in log and "MB of parameters" in log
    assert "deferred initialisation: the model was built without its parameters' memory" in log
    assert "initial.pt: 45 tensors loaded (each rank its slices), 0 replaced" in log


def test_sharded_checkpoints_are_dcp_folders_with_a_digest_per_file(runs: Path) -> None:
    folder = run_dir(runs, "fsdp") / "checkpoints"
    steps = checkpoint.step_files(folder)
    assert all(path.is_dir() for path in steps) and (folder / "last.ptr").read_text().strip() == steps[-1].name
    best = folder / (folder / "best.ptr").read_text().strip()
    assert set(steps) == {*steps[-2:], best}  # ckpt.keep_last=2, and the folder best.ptr names kept apart
    assert not list(folder.glob("*.pt")) and not list(folder.glob(".*"))  # no file form, no leftovers
    pieces = torch.load(steps[-1] / sharded.PIECES, weights_only=True)
    assert pieces["model"] == pieces["optimizer"] == pieces["step"]["ema"]["model"] == sharded.IN_SHARDS
    written = sorted(path.name for path in steps[-1].iterdir() if path.name != sharded.PIECES)
    assert sorted(pieces[sharded.SHARDS]) == written and {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(written)
    # the ddp run keeps today's single file
    assert [path.name for path in checkpoint.step_files(run_dir(runs, "ddp") / "checkpoints")][-1].endswith(".pt")


@pytest.fixture(scope="module")
def stopped(runs: Path) -> dict:
    """An FSDP run stopped by SIGTERM in the middle of its second epoch (DCP checkpoints every 4 steps)."""
    sharded_run(runs, "stopped", "fsdp", *PLAIN, STOP_AT_STEP="15")
    state = last_checkpoint(runs, "stopped")
    assert state["position"]["epoch"] == 1 and state["position"]["consumed"] > 0
    assert checkpoint.latest(run_dir(runs, "stopped")).name == "last.ptr"
    return state


def resume_copy(tmp: Path, name: str, nproc: int, damage: str | None = None) -> str:
    """Resume a copy of the stopped run (its run directory and its record) on ``nproc`` processes,
    after ``damage`` to the newest checkpoint's first shard. Returns the output."""
    shutil.copytree(run_dir(tmp, "stopped"), run_dir(tmp, name))
    shutil.copytree(tmp / "record" / "stopped", tmp / "record" / name)
    if damage is not None:
        damage_shard(run_dir(tmp, name), damage)
    return sharded_run(tmp, name, "fsdp", *PLAIN, nproc=nproc)


def damage_shard(run: Path, how: str) -> Path:
    """Damage the first shard of the run's newest checkpoint folder (``truncated``, ``missing`` or
    ``flipped``: one bit); returns the folder."""
    newest = checkpoint.step_files(run / "checkpoints")[-1]
    shard = newest / "__0_0.distcp"
    data = shard.read_bytes()
    if how == "missing":
        shard.unlink()
    elif how == "truncated":
        shard.write_bytes(data[:len(data) // 2])
    else:
        shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    return newest


def test_fsdp_resume_on_two_processes_is_bitwise_identical(runs: Path, stopped: dict) -> None:
    output = resume_copy(runs, "resumed-2", 2)
    assert "bitwise identical to an uninterrupted run" in output
    resumed, uninterrupted = last_checkpoint(runs, "resumed-2"), last_checkpoint(runs, "fsdp")
    for key, tensor in uninterrupted["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
    for key, tensor in uninterrupted["step"]["ema"]["model"].items():
        assert torch.equal(tensor, resumed["step"]["ema"]["model"][key]), key
    for index, state in uninterrupted["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], resumed["optimizer"]["state"][index]["momentum_buffer"])


@pytest.mark.parametrize("how", ["truncated", "missing", "flipped"])
def test_a_damaged_shard_is_refused_and_the_previous_checkpoint_used(runs: Path, stopped: dict, how: str,
                                                                     tmp_path: Path) -> None:
    shutil.copytree(run_dir(runs, "stopped"), tmp_path / "run")
    newest = damage_shard(tmp_path / "run", how)
    last = checkpoint.latest(tmp_path / "run")
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load(last)
    assert f"checkpoint {newest} is damaged: its shard __0_0.distcp" in str(refused.value)
    state, used = checkpoint.load_for_resume(last, fall_back=True, announce=False)
    assert used == checkpoint.step_files(newest.parent)[-2] and state["global_step"] < stopped["global_step"]


def test_a_damaged_pointer_is_refused_in_one_line(tmp_path: Path) -> None:
    pointer = tmp_path / "last.ptr"
    pointer.write_text("../elsewhere\n")
    with pytest.raises(CheckpointError, match=r"checkpoint pointer .*last.ptr is damaged \(it names '../elsewhere'"):
        checkpoint.load(pointer)


def test_a_resume_falls_back_past_a_damaged_shard_and_ignores_a_half_written_save(runs: Path, stopped: dict) -> None:
    """A missing shard in the newest folder, and a newer save killed before its rename (a hidden
    temporary folder with shards but no pieces): the run resumes from the previous checkpoint,
    finishes as the uninterrupted run does, and removes the leftover."""
    name = "fallback"
    half_written = run_dir(runs, "stopped").parent / "half" / ".step_000000099.tmp.1"
    shutil.copytree(checkpoint.step_files(run_dir(runs, "stopped") / "checkpoints")[-1], half_written)
    (half_written / sharded.PIECES).unlink()
    shutil.copytree(run_dir(runs, "stopped"), run_dir(runs, name))
    shutil.copytree(runs / "record" / "stopped", runs / "record" / name)
    folder = run_dir(runs, name) / "checkpoints"
    shutil.move(half_written, folder / half_written.name)
    previous = checkpoint.step_files(folder)[-2]
    damaged = damage_shard(run_dir(runs, name), "missing")
    output = sharded_run(runs, name, "fsdp", *PLAIN)
    warning = next(line for line in output.splitlines() if "falling back" in line)
    assert f"{damaged} is damaged: its shard __0_0.distcp is missing" in warning
    assert warning.endswith(f"falling back to {previous}")
    assert not (folder / half_written.name).exists()
    resumed, uninterrupted = last_checkpoint(runs, name), last_checkpoint(runs, "fsdp")
    for key, tensor in uninterrupted["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key


@pytest.mark.parametrize("nproc", [3, 1])
def test_fsdp_resume_on_another_world_size_sees_each_sample_once(runs: Path, stopped: dict, nproc: int) -> None:
    name = f"resumed-{nproc}"
    resume_copy(runs, name, nproc)
    assert_each_sample_once(runs, name)
    final = last_checkpoint(runs, name)
    assert final["epoch"] == EPOCHS and final["world_size"] == nproc
    # the learning rate is the same function of progress as in the uninterrupted run
    reference = {round(s["start"], 12): s["lr"] for s in recorded(runs, "fsdp", "steps", 0)}
    common = [(s["lr"], reference[round(s["start"], 12)]) for s in recorded(runs, name, "steps", 0)
              if round(s["start"], 12) in reference]
    assert len(common) >= 4 and all(abs(a - b) <= 1e-9 for a, b in common)
    if nproc == 3:  # a third of the state per rank
        assert memory(runs, name) == pytest.approx(memory(runs, "ddp") / 3, rel=0.1)


def assert_each_sample_once(tmp: Path, name: str) -> None:
    """Every training sample served once per epoch, over all the attempts and ranks of run ``name``."""
    served = Counter((s["epoch"], s["index"]) for s in recorded(tmp, name, "served") if s["size"] == TRAIN_SIZE)
    for epoch in range(EPOCHS):
        seen = sorted(i for (e, i), count in served.items() if e == epoch for _ in range(count))
        assert seen == list(range(TRAIN_SIZE)), f"epoch {epoch + 1} missed or repeated samples"


def evaluate(tmp: Path, path: Path) -> dict:
    result = run([str(path), "--code", str(TESTS)], module="trainer.evaluate")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_evaluate_reads_a_dcp_checkpoint_as_its_single_file_export(runs: Path) -> None:
    last = run_dir(runs, "fsdp") / "checkpoints" / "last.ptr"
    single = runs / "fsdp-single.pt"
    exported = run([str(last), "--format", "pt", "-o", str(single)], module="trainer.export")
    assert exported.returncode == 0, exported.stderr
    whole, from_file = checkpoint.load(last), checkpoint.load(single)
    assert whole["optimizer"]["state"].keys() == from_file["optimizer"]["state"].keys()
    for key, tensor in whole["model"].items():
        assert torch.equal(tensor, from_file["model"][key]), key
    assert evaluate(runs, last) == evaluate(runs, single)


@pytest.mark.parametrize("keys", [["ckpt.format=dcp"], ["ckpt.async_save=true"],
                                  ["dist.strategy=fsdp", "ckpt.format=file", "ckpt.async_save=true"]])
def test_dcp_is_refused_under_ddp_in_one_line(keys: list[str]) -> None:
    with pytest.raises(ConfigError) as refused:
        config.load(overrides=keys)
    assert "dist.strategy=fsdp or hsdp" in str(refused.value) and "\n" not in str(refused.value)


def test_async_save_writes_while_training_goes_on_and_a_stop_waits_for_it(runs: Path) -> None:
    """Every save in the background (the periodic ones while the next steps run), the stop's too:
    the stopped run's checkpoint is complete, and the resume ends bitwise as the uninterrupted run."""
    name = "async"
    sharded_run(runs, name, "fsdp", *PLAIN, "ckpt.async_save=true", STOP_AT_STEP="15")
    assert last_checkpoint(runs, name)["position"]["consumed"] > 0
    output = sharded_run(runs, name, "fsdp", *PLAIN, "ckpt.async_save=true")
    assert "resumed from" in output and not list((run_dir(runs, name) / "checkpoints").glob(".*"))
    resumed, uninterrupted = last_checkpoint(runs, name), last_checkpoint(runs, "fsdp")
    for key, tensor in uninterrupted["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key


def test_compile_under_fsdp_compiles_each_block_in_place_then_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.compile`` under fsdp: each block compiled in place (parameter names unchanged, no
    whole-model wrapper), then sharded; a step computes what the model computes uncompiled. Dynamo's
    ``aot_eager`` backend stands in for inductor: the same tracing, graphs and autograd, without
    generating C++ (minutes on CI's CPUs). One process: the wrapping is the point."""
    assert config.load(overrides=["dist.strategy=fsdp", "model.compile=true"]).model.compile
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallel = FullyShardedParallel(distributed.DistEnv(distributed.Topology(), torch.device("cpu"), "gloo"),
                                        "fp32", True, None, compile_model=True)
        torch.manual_seed(0)
        net = build(3)
        reference = copy.deepcopy(net)
        torch._dynamo.reset()
        assert parallel.wrap(net, find_blocks(net)) is net
        assert all(block._compiled_call_impl is not None for block in find_blocks(net))
        assert net._compiled_call_impl is None and net.state_dict().keys() == reference.state_dict().keys()
        images = torch.randn(4, 3, 8, 8)
        for model in (net, reference):
            model(images).square().mean().backward()
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
        for sharded_param, param in zip(net.parameters(), reference.parameters()):
            torch.testing.assert_close(sharded_param.grad.full_tensor(), param.grad, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("key", ["log.graph=true", "log.histogram_every_epochs=1"])
def test_what_fsdp_does_not_do_yet_is_refused_in_one_line(key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config.load(overrides=["dist.strategy=fsdp", key])
    assert "dist.strategy=fsdp" in str(refused.value) and "\n" not in str(refused.value)
