"""ConfusionMeter / TrainMeter against metrics computed by hand with plain Python loops."""

from __future__ import annotations

import json
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.tasks.confusion import ConfusionMeter
from trainer.train.meter import TrainMeter

CPU = torch.device("cpu")


def logits_for(preds: list[int], num_classes: int) -> torch.Tensor:
    """Logits whose argmax is ``preds`` and whose ranking of the other classes varies per sample."""
    g = torch.Generator().manual_seed(len(preds))
    logits = torch.rand(len(preds), num_classes, generator=g)
    logits[torch.arange(len(preds)), torch.tensor(preds)] = 2.0
    return logits


def reference(logits: list[list[float]], targets: list[int], num_classes: int) -> dict[str, float]:
    """Accuracy, top-5 and macro precision/recall/F1 over every class seen as a target or a prediction
    (the convention of scikit-learn and torchmetrics); classes never seen are left out."""
    preds = [max(range(num_classes), key=lambda c: row[c]) for row in logits]
    top5_hits = sum(t in sorted(range(num_classes), key=lambda c: -row[c])[:5] for row, t in zip(logits, targets))
    labels = sorted(set(targets) | set(preds))
    precision, recall, f1 = [], [], []
    for c in labels:
        tp = sum(1 for p, t in zip(preds, targets) if p == c and t == c)
        predicted = sum(1 for p in preds if p == c)
        actual = sum(1 for t in targets if t == c)
        prec = tp / predicted if predicted else 0.0
        rec = tp / actual if actual else 0.0
        precision.append(prec)
        recall.append(rec)
        f1.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    n = len(targets)
    return {"top1": sum(p == t for p, t in zip(preds, targets)) / n, "top5": top5_hits / n,
            "precision": sum(precision) / len(labels), "recall": sum(recall) / len(labels),
            "f1": sum(f1) / len(labels), "samples": n}


def eval_metrics(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
    """ConfusionMeter fed in two batches."""
    meter = ConfusionMeter(num_classes, CPU)
    half = len(targets) // 2
    meter.update(logits[:half], targets[:half])
    meter.update(logits[half:], targets[half:])
    return meter.reduce()


def assert_matches(got: dict[str, float], expected: dict[str, float]) -> None:
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_eval_meter_matches_hand_computation() -> None:
    # Class 3 is a target but never predicted (precision 0), class 5 is neither (left out).
    targets = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4]
    preds = [0, 0, 1, 1, 1, 0, 2, 4, 0, 2, 4, 4]
    logits = logits_for(preds, num_classes=6)
    logits[8, 3] = -1.0  # sample 8 (class 3) misses the top 5 as well
    expected = reference(logits.tolist(), targets, num_classes=6)
    assert expected["top1"] == 7 / 12 and expected["top5"] == 11 / 12

    got = eval_metrics(logits, torch.tensor(targets), num_classes=6)
    assert_matches(got, expected)
    assert got["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor(targets)).item())


def test_eval_meter_with_fewer_than_five_classes_has_full_top5() -> None:
    targets = [0, 1, 2, 2, 1, 0, 2]
    preds = [1, 1, 2, 0, 0, 0, 2]
    got = eval_metrics(logits_for(preds, 3), torch.tensor(targets), num_classes=3)
    assert got["top5"] == 1.0 and got["top1"] == 4 / 7
    assert_matches(got, reference(logits_for(preds, 3).tolist(), targets, num_classes=3))


def test_eval_meter_counts_predicted_class_absent_from_targets() -> None:
    # Class 2 is predicted twice but is never a target: its precision (0) belongs in the macro mean.
    targets = [0, 0, 1, 1, 0, 1]
    preds = [0, 2, 1, 2, 0, 1]
    expected = reference(logits_for(preds, 3).tolist(), targets, num_classes=3)
    assert expected["precision"] == pytest.approx((1 + 1 + 0) / 3)
    assert_matches(eval_metrics(logits_for(preds, 3), torch.tensor(targets), num_classes=3), expected)


def test_eval_meter_empty_is_zero_not_nan() -> None:
    got = ConfusionMeter(4, CPU).reduce()
    assert got == {"loss": 0.0, "top1": 0.0, "top5": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                   "samples": 0}


def train_meter(losses: list[float], sizes: list[int], steps: list[int], window: int = 8) -> TrainMeter:
    meter = TrainMeter(window)
    for loss, size, step in zip(losses, sizes, steps):
        meter.update(torch.tensor(loss), size, step)
    return meter


def test_train_meter_weights_loss_by_batch_size() -> None:
    meter = train_meter([1.0, 3.0], sizes=[2, 6], steps=[0, 1])
    assert meter.flush() is None
    assert meter.mean_loss() == pytest.approx((2 * 1.0 + 6 * 3.0) / 8)  # not the batch mean 2.0
    assert not dist.is_initialized()
    assert meter.reduce() == pytest.approx({"loss": 2.5, "samples": 8})
    assert meter.reduce()["samples"] == 8  # reduce does not consume the sums


def test_train_meter_flushes_itself_when_the_window_is_full() -> None:
    losses, sizes = [1.0, 2.0, 3.0, 4.0, 5.0], [1, 2, 3, 4, 5]
    meter = train_meter(losses, sizes, steps=list(range(5)), window=2)
    assert meter.flush() is None
    expected = sum(loss * size for loss, size in zip(losses, sizes)) / sum(sizes)
    assert meter.reduce() == pytest.approx({"loss": expected, "samples": 15})


def test_train_meter_state_round_trip() -> None:
    first = train_meter([1.0, 3.0], sizes=[2, 6], steps=[0, 1])
    first.flush()
    resumed = TrainMeter(8)
    resumed.load_state(first.state())
    resumed.update(torch.tensor(5.0), 2, 2)
    resumed.flush()
    assert resumed.reduce() == pytest.approx({"loss": (2 + 18 + 10) / 10, "samples": 10})


def test_train_meter_flush_names_first_non_finite_step() -> None:
    meter = train_meter([1.0, float("nan"), float("inf"), 2.0], sizes=[4] * 4, steps=[10, 11, 12, 13])
    assert meter.flush() == 11
    assert meter.flush() is None  # reported once


def test_train_meter_names_step_under_gradient_accumulation() -> None:
    # grad_accum_steps=2: the Worker passes the optimizer step, which two micro-batches share.
    meter = train_meter([1.0, 1.0, float("nan"), 1.0], sizes=[4] * 4, steps=[5, 5, 6, 6])
    assert meter.flush() == 6


def test_train_meter_reports_non_finite_loss_from_an_automatic_flush() -> None:
    meter = train_meter([float("nan"), 1.0, 1.0], sizes=[4] * 3, steps=[0, 1, 2], window=2)
    assert meter.flush() == 0  # the NaN was folded in by update()'s own flush


# --- two real processes ------------------------------------------------------------------------------

NUM_CLASSES = 6


def shared_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(20, NUM_CLASSES, generator=g), torch.randint(0, NUM_CLASSES, (20,), generator=g)


def reduce_shard(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it would hang)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        logits, targets = shared_batch()
        shard = slice(0, 7) if rank == 0 else slice(7, 20)  # unequal shards
        evals, train = ConfusionMeter(NUM_CLASSES, CPU), TrainMeter(4)
        evals.update(logits[shard], targets[shard])
        train.update(torch.tensor(float(rank + 1)), shard.stop - shard.start, 0)
        train.flush()
        Path(out, f"{rank}.json").write_text(json.dumps({"eval": evals.reduce(), "train": train.reduce()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_reduce_over_two_gloo_processes_equals_one_meter(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # fork: the ranks skip re-importing torch (seconds each); they only run tiny CPU ops and gloo.
    ranks = mp.start_processes(reduce_shard, args=(port, str(tmp_path)), nprocs=2, join=False,
                               start_method="fork")
    deadline = time.monotonic() + 60
    while not ranks.join(timeout=1):  # re-raises a rank's exception
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 60 s")

    logits, targets = shared_batch()
    whole = ConfusionMeter(NUM_CLASSES, CPU)
    whole.update(logits, targets)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result["eval"] == pytest.approx(whole.reduce())
        assert result["train"] == pytest.approx({"loss": (7 * 1.0 + 13 * 2.0) / 20, "samples": 20})
