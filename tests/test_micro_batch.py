"""``train.micro_batch=auto`` on real gloo process groups: an out-of-memory forward on one rank
halves the micro-batch on every rank and trains the same weights as the equivalent configuration.

The user's model (``oom_net.py``) raises ``torch.OutOfMemoryError`` on rank 1 whenever a pass takes
more than 16 samples. At ``data.batch_size=64`` per process, rank r's batch of 64 holds positions
r, r+2, ..., r+126 of the epoch's order, which are exactly its 4 micro-batches of 16 at
``data.batch_size=16 train.grad_accum_steps=4`` (the sampler strides each global batch over the
ranks), so the two runs see the same samples in the same order and optimizer steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TESTS, child_env, last_checkpoint, metrics_lines, run, run_dir, small_run

from trainer import config
from trainer.tools import report
from trainer.train.micro_batch import MicroBatchChoice, MicroBatches
from trainer.errors import ConfigError, OutOfMemory
from trainer.parallel.distributed import DistEnv, Topology

SIZES = dict(train_per_class=128, val_per_class=64)
"""384 training samples: 3 global batches of 128 on 2 processes, no remainder; 96 validation samples a rank."""


def oom_run(tmp: Path, name: str, *extra: str, nproc: int = 2, batch_size: int = 64, **env: str):
    return run(small_run(tmp, f"log.name={name}", "log.pictures=false", *extra, batch_size=batch_size, **SIZES),
               nproc=nproc, env=child_env(PYTHONPATH=f"{TESTS.parent}:{TESTS}", **env))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """auto at 64 for one epoch, then resumed for a second; 16 x 4 for two epochs from the start."""
    tmp, outputs = tmp_path_factory.mktemp("micro_batch"), {}
    for name, extra in [("auto", ("train.micro_batch=auto", "train.epochs=1")),
                        ("auto", ("train.micro_batch=auto", "train.epochs=2")),
                        ("reference", ("train.grad_accum_steps=4", "train.epochs=2"))]:
        result = oom_run(tmp, name, "model.name=oom_net:build", *extra,
                         batch_size=16 if name == "reference" else 64)
        assert result.returncode == 0, result.stdout + result.stderr
        outputs[name if name not in outputs else "resumed"] = result.stdout
    return tmp, outputs


def test_every_rank_settles_on_16_x_4_in_training_and_16_in_validation(runs: tuple[Path, dict[str, str]]) -> None:
    tmp, outputs = runs
    for role, sizes in [("training", ("64", "32 x 2", "32", "16 x 4")), ("validation", ("64", "32", "32", "16"))]:
        first, second, third, settled = sizes
        assert (f"out of memory in the {role} forward pass on rank 1 at micro-batch {first}: every rank now runs "
                f"{second} ") in outputs["auto"]
        assert f"on rank 1 at micro-batch {third}: every rank now runs {settled} " in outputs["auto"]
    rank_1 = (run_dir(tmp, "auto") / "logs" / "rank_1.log").read_text()
    assert "every rank now runs 16 x 4" in rank_1 and "every rank now runs 16 (" in rank_1
    first = metrics_lines(tmp, "auto")[0]
    assert (first["train/micro_batch"], first["train/micro_batches_per_step"], first["train/val_micro_batch"]) == \
        (16, 4, 16)
    assert first["train/global_batch"] == 128


def test_a_resume_keeps_16_x_4_without_running_out_of_memory_again(runs: tuple[Path, dict[str, str]]) -> None:
    tmp, outputs = runs
    assert "micro-batch 16 x 4 in training, 16 in validation, from the checkpoint" in outputs["resumed"]
    assert "out of memory" not in outputs["resumed"]
    assert last_checkpoint(tmp, "auto")["step"]["micro_batch"] == {"train": 16, "val": 16}


def test_the_weights_and_metrics_equal_those_of_16_x_4_from_the_start(runs: tuple[Path, dict[str, str]]) -> None:
    tmp, _ = runs
    auto, reference = last_checkpoint(tmp, "auto"), last_checkpoint(tmp, "reference")
    assert auto["global_step"] == reference["global_step"] == 6
    for key, tensor in auto["model"].items():
        torch.testing.assert_close(tensor, reference["model"][key], rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(metrics_lines(tmp, "auto"), metrics_lines(tmp, "reference"), strict=True):
        assert mine["val/top1"] == theirs["val/top1"] and mine["val/samples"] == theirs["val/samples"] == 192
        assert mine["val/loss"] == pytest.approx(theirs["val/loss"], rel=1e-5)
        assert mine["train/loss"] == pytest.approx(theirs["train/loss"], rel=1e-5)


def test_a_backward_out_of_memory_ends_the_run_and_the_next_start_halves(tmp_path: Path) -> None:
    """One process, rank 0 out of memory in its backward pass beyond 16 samples, a BatchNorm model."""
    args = ("model.name=oom_net:build_backward", "train.micro_batch=auto", "train.epochs=1")
    failed = oom_run(tmp_path, "backward", *args, nproc=1, batch_size=32, OOM_RANK="0")
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "model has BatchNorm" in failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cpu ran out of memory at data.batch_size=32 per process;")
    assert last.endswith("train.micro_batch=auto: the backward pass ran out at micro-batch 32, "
                         "the next start of this run uses 16")
    again = oom_run(tmp_path, "backward", *args, nproc=1, batch_size=32, OOM_RANK="0")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "train.micro_batch=auto: micro-batch 16 x 2 in training, 32 in validation, from" in again.stdout
    assert metrics_lines(tmp_path, "backward")[-1]["train/micro_batches_per_step"] == 2


def test_auto_is_refused_in_one_line_under_fsdp() -> None:
    with pytest.raises(ConfigError) as refused:
        config.load(overrides=["dist.strategy=fsdp", "train.micro_batch=auto"])
    assert str(refused.value) == ("train.micro_batch=auto: not available with dist.strategy=fsdp yet; "
                                  "turn it off or use dist.strategy=ddp")


def test_the_run_report_shows_the_micro_batch_each_run_trained_with(runs: tuple[Path, dict[str, str]]) -> None:
    tmp, _ = runs
    lines = report.table([report.load_run(run_dir(tmp, name)) for name in ("auto", "reference")], "val/top1",
                         "max").splitlines()
    assert "micro-batch" in lines[0]
    assert "16 x 4 (val 16)" in lines[2] and " 16 x 4 " in lines[3] + " "


@pytest.mark.parametrize("count", [1, 3, 63, 64])
def test_pieces_cover_a_batch_in_order_and_a_doubling_continues_where_it_stopped(count: int) -> None:
    cut = MicroBatchChoice.fixed().train
    for pieces in (1, 2, 4, 8):
        cut.pieces = pieces
        spans = [cut.span(count, piece) for piece in range(pieces)]
        assert [start for start, _ in spans[1:]] == [end for _, end in spans[:-1]]
        assert spans[0][0] == 0 and spans[-1][1] == count and spans[-1][0] < count
        cut.pieces = pieces * 2
        assert [(cut.span(count, 2 * j)[0], cut.span(count, 2 * j + 1)[1]) for j in range(pieces)] == spans


def test_one_sample_too_many_ends_the_run_in_one_line_and_a_resume_fits_any_batch_size() -> None:
    one_process = DistEnv(Topology(), torch.device("cpu"), None)
    cut = MicroBatches(one_process, True, 4, "training", accumulation=2)
    assert cut.agree(True) == (True, False) and cut.describe() == "2 x 4"
    assert cut.agree(False) == (False, False) and cut.agree(True)[0] and cut.describe() == "1 x 8"
    with pytest.raises(OutOfMemory) as ended:
        cut.agree(True)
    assert str(ended.value) == ("cpu ran out of memory in training on rank 0 even at one sample per forward "
                                "(train.micro_batch=auto); use a smaller model, data.image_size or train.precision=bf16")
    resumed = MicroBatches(one_process, True, 48, "training")
    resumed.load_state_dict(16)  # saved at data.batch_size=64 (16 x 4); resumed at 48: 12 x 4
    assert (resumed.pieces, resumed.size) == (4, 12)
