"""The Task seam, proved by two real tasks beside classification.

Multi-label classification: a generated set of coloured squares (labels: the colours present),
its labels in train.csv and val.json; trained on 2 gloo processes with mAP in metrics.jsonl and
TensorBoard; the same checkpoint evaluated on 1 and 2 processes gives the same per-class AP; a
stopped run resumes bitwise; bad label files are one line. A user's task by import path (a focal
loss in a package on ``--code``) trains, evaluates and resumes exactly. Optimizer, schedule and
tracker take import paths too.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import child_env, run, run_dir, small_run
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer import config
from trainer.config import user_code
from trainer.errors import EXIT_OK, EXIT_STOPPED, ConfigError
from trainer.parallel import distributed
from trainer.parallel.signals import StopRequest
from trainer.tools.evaluate import main as evaluate_main
from trainer.tools.predict import main as predict_main
from trainer.train.worker import Worker

COLOURS = {"red": (230, 30, 30), "green": (30, 210, 40), "blue": (40, 60, 235), "white": (240, 240, 240)}


def write_multilabel_set(root: Path, train: int = 96, val: int = 30, seed: int = 0) -> Path:
    """16 px images with one to three coloured squares in distinct quadrants; labels: their colours."""
    rng = random.Random(seed)
    rows: dict[str, list[tuple[str, list[str]]]] = {"train": [], "val": []}
    for split, count in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True)
        for index in range(count):
            labels = sorted(rng.sample(sorted(COLOURS), rng.randint(1, 3)))
            image = Image.new("RGB", (16, 16), (0, 0, 0))
            for label, quadrant in zip(labels, rng.sample(range(4), len(labels))):
                x, y = 8 * (quadrant % 2), 8 * (quadrant // 2)
                image.paste(COLOURS[label], (x + 1, y + 1, x + 7, y + 7))
            path = f"{split}/{index}.png"
            image.save(root / path)
            rows[split].append((path, labels))
    with open(root / "train.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "labels"])
        writer.writerows([path, " ".join(labels)] for path, labels in rows["train"])
    (root / "val.json").write_text(json.dumps(dict(rows["val"])))
    return root


def multilabel_args(tmp: Path, root: Path, *extra: str) -> list[str]:
    return small_run(tmp, "task.name=multilabel", "data.source=imagefolder", f"data.root={root}", "train.epochs=3",
                     "optim.lr=0.05", "optim.lr_base_batch=0", "log.pictures=true", *extra)


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def in_process_worker(args: list[str]) -> Worker:
    cfg = config.load([], args)
    return Worker(cfg, distributed.setup("cpu"), cfg.run_dir, StopRequest())


def assert_resume_is_bitwise(make: Any, stop_at_step: int = 3) -> tuple[Worker, Worker]:
    """``make(name)`` builds a Worker; one runs through, one stops at a micro-batch and resumes:
    both end with the same weights, steps and history."""
    through = make("through")
    assert through.fit() == EXIT_OK
    stopped = make("stopped")
    loss, calls = stopped.task.loss, []

    def stop_there(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == stop_at_step:
            stopped.stop.received.append("SIGTERM")
        return loss(logits, targets)

    stopped.task.loss = stop_there  # type: ignore[method-assign]
    assert stopped.fit() == EXIT_STOPPED and 0 < stopped.position.consumed
    resumed = make("stopped")
    resumed.resume(resumed.run_dir / "checkpoints" / "last.pt")
    assert resumed.fit() == EXIT_OK and resumed.record.global_step == through.record.global_step
    for key, value in through.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[key], value), key
    timings = ("images_per_s", "data_wait", "time_s", "peak_mem_mb", "tflops", "mfu")
    strip = [{k: v for k, v in r.items() if not k.endswith(timings)} for r in through.record.history]
    assert [{k: v for k, v in r.items() if not k.endswith(timings)} for r in resumed.record.history] == strip
    return through, resumed


# ----------------------------------------------------------------------------- multi-label
@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 2-process training run, then its last checkpoint evaluated on 1 and on 2 processes."""
    tmp = tmp_path_factory.mktemp("multilabel")
    root = write_multilabel_set(tmp / "colours")
    trained = run(multilabel_args(tmp, root, "log.name=two"), nproc=2, timeout=240)
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-3000:]
    ckpt = str(run_dir(tmp, "two") / "checkpoints" / "last.pt")
    evaluated = {nproc: run([ckpt, "data.num_workers=0"], nproc=nproc, module="trainer.evaluate", timeout=180)
                 for nproc in (1, 2)}
    for done in evaluated.values():
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    records = [json.loads(line) for line in (run_dir(tmp, "two") / "metrics.jsonl").read_text().splitlines()]
    return {"tmp": tmp, "root": root, "records": records, "stdout": trained.stdout,
            "evaluated": {nproc: last_json(done.stdout) for nproc, done in evaluated.items()}}


@pytest.mark.slow
def test_multilabel_trains_on_two_processes_with_map_in_the_logs_and_trackers(multilabel_run: dict[str, Any]) -> None:
    records, tmp = multilabel_run["records"], multilabel_run["tmp"]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert {"val/map", "val/f1", "val/f1_macro", "val/precision", "val/recall", "val/loss"} <= set(records[-1])
    assert records[-1]["val/map"] > 0.9 and records[-1]["val/map"] > records[0]["val/map"], records
    assert "mAP" in multilabel_run["stdout"] and "done: val/map" in multilabel_run["stdout"]
    events = EventAccumulator(str(run_dir(tmp, "two") / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [round(e.value, 6) for e in events.Scalars("val/map")] == [round(r["val/map"], 6) for r in records]
    per_class = json.loads((run_dir(tmp, "two") / "per_class.json").read_text())
    assert [row["class"] for row in per_class["classes"]] == sorted(COLOURS)
    assert all(0 < row["ap"] <= 1 for row in per_class["classes"])


@pytest.mark.slow
def test_the_same_checkpoint_evaluated_on_one_and_two_processes_gives_the_same_per_class_ap(
        multilabel_run: dict[str, Any]) -> None:
    one, two = multilabel_run["evaluated"][1], multilabel_run["evaluated"][2]
    assert one["samples"] == two["samples"] == 30
    assert [row["class"] for row in one["per_class"]] == sorted(COLOURS)
    for mine, theirs in zip(one["per_class"], two["per_class"]):
        assert mine["ap"] == pytest.approx(theirs["ap"], abs=1e-6), (mine, theirs)
        assert mine["support"] == theirs["support"]
    assert one["map"] == pytest.approx(two["map"], abs=1e-6)
    assert one["map"] == pytest.approx(multilabel_run["records"][-1]["val/map"], abs=1e-6)  # what training logged


@pytest.mark.slow
def test_predict_prints_each_labels_own_probability(multilabel_run: dict[str, Any],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root, tmp = multilabel_run["root"], multilabel_run["tmp"]
    truth = json.loads((root / "val.json").read_text())
    paths = sorted(truth)[:6]
    assert predict_main([str(run_dir(tmp, "two") / "checkpoints" / "last.pt"), *(str(root / p) for p in paths),
                         "-k", str(len(COLOURS))]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(paths)
    for path, line in zip(paths, lines):
        ranked = line.split("\t")[1].split("  ")
        probabilities = {name: float(p) for name, p in (entry.split() for entry in ranked)}
        assert set(probabilities) == set(COLOURS) and all(0 <= p <= 1 for p in probabilities.values())
        assert ranked[0].split()[0] in truth[path]  # the most likely label is one of the image's
    assert any(abs(sum(float(e.split()[1]) for e in line.split("\t")[1].split("  ")) - 1) > 0.05 for line in lines)


def test_multilabel_resumes_bitwise_on_one_process(tmp_path: Path) -> None:
    root = write_multilabel_set(tmp_path / "colours", train=40, val=12)
    through, _ = assert_resume_is_bitwise(
        lambda name: in_process_worker(multilabel_args(tmp_path, root, f"log.name={name}", "train.epochs=2",
                                                       "log.pictures=false")))
    assert through.cfg.ckpt.metric == "val/map" and through.task.name == "multilabel"


def test_a_bad_label_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """Through the command line (every refusal of a label file is in test_labels)."""
    root = write_multilabel_set(tmp_path / "colours", train=4, val=2)
    (root / "train" / "0.png").unlink()
    done = run(multilabel_args(tmp_path, root), timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("error: ") and "train.csv, line 2: 'train/0.png' is not a file under" in lines[0]


def test_multilabel_on_a_single_label_source_is_refused_before_training(tmp_path: Path) -> None:
    done = run(small_run(tmp_path, "task.name=multilabel"), timeout=120)
    assert done.returncode == 2 and "needs data.source=imagefolder with train.csv and val.csv" in done.stderr


# ----------------------------------------------------------------------------- a user's task
FOCAL = '''
import torch

from trainer.tasks.classification import Classification

CALLS = []


class Focal(Classification):
    """Focal loss (gamma 2): hard samples weigh more."""

    def loss(self, logits, targets):
        CALLS.append(1)
        ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        return ((1 - torch.exp(-ce)) ** 2 * ce).mean()


def build(cfg):
    return Focal()


def not_a_task(cfg):
    return object()
'''


@pytest.fixture
def user_package(tmp_path: Path) -> Path:
    code = tmp_path / "code"
    (code / "mytasks").mkdir(parents=True)
    (code / "mytasks" / "__init__.py").write_text(FOCAL)
    user_code.add_code_dirs([code])
    yield code
    sys.modules.pop("mytasks", None)


def test_a_user_task_by_import_path_trains_evaluates_and_resumes_exactly(
        tmp_path: Path, user_package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import mytasks

    args = ["task.name=mytasks:build", "model.name=linear", "train.epochs=2", "log.pictures=false"]
    through, _ = assert_resume_is_bitwise(lambda name: in_process_worker(small_run(tmp_path, *args,
                                                                                   f"log.name={name}")))
    assert type(through.task).__name__ == "Focal" and len(mytasks.CALLS) > 0
    assert through.cfg.ckpt.metric == "val/top1"  # auto: the task's first metric
    capsys.readouterr()
    last = str(through.run_dir / "checkpoints" / "last.pt")
    assert evaluate_main([last, "--code", str(user_package)]) == 0
    metrics = last_json(capsys.readouterr().out)
    assert metrics["top1"] == pytest.approx(through.record.history[-1]["val/top1"], abs=1e-9)


def test_a_user_task_that_is_no_task_is_one_line(tmp_path: Path, user_package: Path) -> None:
    with pytest.raises(ConfigError, match=r"task.name: mytasks:not_a_task returned an instance of object without "
                                          r"target_form, metrics, loss, .*; subclass trainer.tasks.classification"):
        in_process_worker(small_run(tmp_path, "task.name=mytasks:not_a_task"))


# ----------------------------------------------------------------------------- open registries
REGISTRIES = '''
import json

import torch

from trainer.observe.trackers import Sink


def plain_sgd(groups, cfg):
    return torch.optim.SGD(groups, lr=cfg.lr)


def halving(start, end, cfg, epochs):
    return 0.5 ** int(start)


class Lines(Sink):
    name = "lines"

    def __init__(self, path):
        self.path = path

    def epoch(self, record, step):
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, "lr": record["train/lr"]}) + "\\n")


def lines(run_dir, cfg):
    return Lines(run_dir / "lines.jsonl")
'''


def test_optimizer_schedule_and_tracker_take_import_paths(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "myparts.py").write_text(REGISTRIES)
    done = run(["--code", str(code), *small_run(tmp_path, "model.name=linear", "train.epochs=2", "log.name=parts",
                                                "optim.name=myparts:plain_sgd", "sched.name=myparts:halving",
                                                "log.trackers=[jsonl,myparts:lines]")],
               env=child_env(), timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    lines = [json.loads(line) for line in (run_dir(tmp_path, "parts") / "lines.jsonl").read_text().splitlines()]
    peak = 0.1 * 8 / 256  # optim.lr for 256 samples, scaled to the global batch of 8: a user's optimizer too
    assert [line["lr"] for line in lines] == [pytest.approx(peak), pytest.approx(peak / 2)]  # the user's schedule
    saved = torch.load(run_dir(tmp_path, "parts") / "checkpoints" / "last.pt", weights_only=True)
    assert all("momentum_buffer" not in state for state in saved["optimizer"]["state"].values())  # plain SGD
