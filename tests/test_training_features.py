"""Gradient accumulation, clipping, bf16 on CPU, non-finite losses and EMA, on the real Worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import last_checkpoint, run, small_run
from omegaconf import OmegaConf

from trainer import config
from trainer.errors import NonFiniteLoss
from trainer.parallel import distributed
from trainer.parallel.signals import StopRequest
from trainer.train.worker import Worker

EXACT_LINEAR = ["model.name=linear", "train.label_smoothing=0", "optim.weight_decay=0", "optim.momentum=0",
                "data.random_resized_crop=false", "data.hflip=false", "sched.name=constant", "sched.warmup_epochs=0",
                "optim.lr_base_batch=0"]


def small(tmp: Path, *extra: str) -> list[str]:
    return small_run(tmp, "train.epochs=2", *extra, val_per_class=8, batch_size=64)


def build_worker(tmp: Path, *extra: str) -> Worker:
    cfg = config.load([], small(tmp, *extra))
    env = distributed.setup("cpu")
    return Worker(cfg, env, cfg.run_dir, StopRequest())


def weights_after(tmp: Path, name: str, *extra: str, nproc: int = 1) -> dict[str, torch.Tensor]:
    result = run(small(tmp, f"log.name={name}", *extra), nproc=nproc)
    assert result.returncode == 0, result.stdout + result.stderr
    return last_checkpoint(tmp, name)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_accumulating_two_batches_equals_one_double_batch(tmp_path: Path, nproc: int) -> None:
    double = weights_after(tmp_path, "double", *EXACT_LINEAR, "data.batch_size=16", nproc=nproc)
    accumulated = weights_after(tmp_path, "accum", *EXACT_LINEAR, "data.batch_size=8", "train.grad_accum_steps=2",
                                nproc=nproc)
    for key, tensor in double.items():
        torch.testing.assert_close(accumulated[key], tensor, atol=1e-5, rtol=0)


def test_clipping_caps_the_global_gradient_norm(tmp_path: Path) -> None:
    norms: dict[str, list[float]] = {}
    for clip in ("0", "0.05"):
        worker = build_worker(tmp_path, f"train.clip_grad_norm={clip}", "train.epochs=1")
        seen = norms.setdefault(clip, [])
        original_step = worker.optimizer.step

        def recording_step(*args: object, _seen: list = seen, _w: Worker = worker, _step=original_step) -> object:
            grads = [p.grad for p in _w.net.parameters() if p.grad is not None]
            _seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            return _step(*args)

        worker.optimizer.step = recording_step  # type: ignore[method-assign]
        assert worker.train_epoch() is not None
    assert max(norms["0"]) > 0.05, "without clipping the test would prove nothing"
    assert max(norms["0.05"]) <= 0.05 + 1e-6


@pytest.mark.slow
def test_bf16_autocast_on_cpu_trains(tmp_path: Path) -> None:
    weights_after(tmp_path, "bf16", "train.precision=bf16", "train.epochs=3", "data.image_size=24")
    records = [json.loads(line) for line in (tmp_path / "runs" / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    assert OmegaConf.load(tmp_path / "runs" / "bf16" / "config.yaml").train.precision == "bf16"


def inject_nan_loss(worker: Worker, on_batch: int) -> None:
    """Make the worker's loss NaN on its ``on_batch``-th training batch (1-based)."""
    criterion, calls = worker.task.loss, []

    def nan_once(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        loss = criterion(logits, targets)
        return loss * float("nan") if len(calls) == on_batch else loss

    worker.task.loss = nan_once  # type: ignore[method-assign]


def test_an_injected_nan_loss_stops_with_its_step_number(tmp_path: Path) -> None:
    worker = build_worker(tmp_path, "log.name=nan")
    inject_nan_loss(worker, on_batch=5)
    with pytest.raises(NonFiniteLoss, match=r"NaN/inf at step 5 \(epoch 2\)"):
        worker.fit()
    saved = [torch.load(p, weights_only=True)["global_step"] for p in (worker.run_dir / "checkpoints").glob("step_*.pt")]
    assert saved and max(saved) < 5, "only the healthy epoch-1 model is checkpointed, never a diverged one"


def test_a_nan_step_is_skipped_when_configured(tmp_path: Path) -> None:
    worker = build_worker(tmp_path, "log.name=skip", "train.on_nonfinite_loss=skip", "train.epochs=1")
    inject_nan_loss(worker, on_batch=3)
    assert worker.fit() == 0
    assert worker.step.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in worker.net.parameters())


def test_ema_weights_differ_from_and_track_the_model(tmp_path: Path) -> None:
    worker = build_worker(tmp_path, "log.name=ema", "train.ema_decay=0.9", "train.epochs=2", "data.batch_size=16")
    initial = [p.detach().clone() for p in worker.net.parameters()]
    assert worker.fit() == 0
    model = list(worker.net.parameters())
    ema = list(worker.step.ema.module.parameters())
    gap = sum((e - m).norm().item() for e, m in zip(ema, model))
    travelled = sum((i - m).norm().item() for i, m in zip(initial, model))
    assert gap > 0 and gap < 0.5 * travelled
    record = json.loads((worker.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < record["val_ema/top1"] <= 1 and record["val_ema/samples"] == record["val/samples"]
