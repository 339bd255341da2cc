"""Trackers, pictures, profiling and early stopping, read back with each tool's own reader.

Real runs: torchrun with 2 processes (gloo), wandb offline files decoded with wandb's protobuf
classes, the MLflow store queried with MlflowClient, TensorBoard events with EventAccumulator.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trainer import config
from trainer.errors import ConfigError
from trainer.models import flops
from trainer.observe.hosted import StepAxis
from trainer.observe.pictures import MAX_LABELLED_CLASSES, confusion_image
from trainer.observe.profiling import StepProfiler
from trainer.observe.trackers import BackgroundSink, Sink, markdown_table
from trainer.tasks.confusion import top_confusions
from trainer.train.early_stop import early_stop_reason

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ALL_TRACKERS = "log.trackers=[tensorboard,jsonl,wandb,mlflow]"


def run_args(tmp: Path, name: str, *extra: str) -> list[str]:
    return [f"log.output_dir={tmp / 'runs'}", f"log.name={name}", f"data.cache_dir={tmp / 'cache'}",
            "data.synthetic_classes=3", "data.synthetic_train_per_class=48", "data.synthetic_val_per_class=8",
            "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "log.progress_bar=off",
            "dist.timeout_s=60", *extra]


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def trainer(tmp: Path, name: str, *extra: str, launcher: tuple[str, ...] = (sys.executable,),
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, "-m", "trainer", *run_args(tmp, name, *extra)], cwd=REPO,
                          env=env or child_env(), capture_output=True, text=True, timeout=300)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file: wandb's LevelDB-style log of its own protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", "not a wandb transaction log"
    found, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if room < 7 or (length == 0 and kind == 0):  # block trailer / zero padding
            pos += room
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
            pending = b""
    return found


def wandb_runs(run_dir: Path) -> dict[str, list[tuple[str, list[dict]]]]:
    """Per offline run folder (oldest first): its run id and its history rows."""
    runs = {}
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        run_id, history = None, []
        for record in wandb_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
        runs[folder.name] = (run_id, history)
    return runs


def mlflow_runs(run_dir: Path) -> tuple[object, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments)


# ----------------------------------------------------------------------------- 2 processes, one run
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """2 processes, every tracker and picture, a profiled window, and a metric that cannot improve
    (a learning rate of 1e-9) under early stopping with patience 2."""
    tmp = tmp_path_factory.mktemp("trackers")
    result = trainer(tmp, "ddp", ALL_TRACKERS, "log.histogram_every_epochs=1", "log.graph=true",
                     "log.profile_steps=2-3", "optim.lr=1e-9", "train.epochs=8", "train.early_stop_patience=2",
                     "train.early_stop_min_delta=0.01", launcher=tuple(TORCHRUN))
    return tmp / "runs" / "ddp", result


@pytest.mark.slow
def test_early_stopping_ends_both_ranks_with_exit_0_and_the_best_checkpoint(ddp_run) -> None:
    run_dir, result = ddp_run
    assert result.returncode == 0, result.stdout + result.stderr  # torchrun: 0 only if both ranks exit 0
    stops = [line for line in result.stdout.splitlines() if line.startswith("early stop after epoch 3:")]
    assert len(stops) == 1 and "val/top1 has not improved by more than 0.01 for 2 epochs" in stops[0], result.stdout
    assert [r["epoch"] for r in records(run_dir)] == [1, 2, 3]
    best = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 1  # the first epoch set the best; the next two did not beat it
    assert "done: val/top1" in result.stdout
    again = trainer(run_dir.parents[1], "ddp", "optim.lr=1e-9", "train.epochs=8", "train.early_stop_patience=2",
                    "train.early_stop_min_delta=0.01", "log.trackers=[jsonl]")
    assert again.returncode == 0 and "early stop after epoch 3:" in again.stdout, again.stdout + again.stderr
    assert len(records(run_dir)) == 3  # the resumed run decides from the same history: no fourth epoch


@pytest.mark.slow
def test_two_processes_open_exactly_one_run_in_each_tracker(ddp_run) -> None:
    run_dir, result = ddp_run
    wandb = wandb_runs(run_dir)
    assert len(wandb) == 1, wandb.keys()
    (run_id, history), = wandb.values()
    assert [row["val/top1"] for row in history if "val/top1" in row] == [r["val/top1"] for r in records(run_dir)]
    client, runs = mlflow_runs(run_dir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/top1")] == \
        [r["step"] for r in records(run_dir)]
    assert runs[0].data.params["train.early_stop_patience"] == "2"
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["trackers"]["wandb"] == run_id
    assert state["trackers"]["mlflow"] == runs[0].data.tags["launchpad.resume_key"]


@pytest.mark.slow
def test_tensorboard_holds_the_pictures_tables_histograms_and_graph(ddp_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = ddp_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/augmented_samples", "val/confusion_matrix", "val/worst_mistakes"} <= set(tags["images"])
    assert len(events.Images("val/confusion_matrix")) == 3  # one per epoch
    grid = events.Images("train/augmented_samples")[0]
    assert grid.width > 4 * 96 and grid.height >= 2 * 96  # 16 samples, enlarged to be seen
    assert {"val/per_class/text_summary", "val/top_confusions/text_summary"} <= set(tags["tensors"])
    table = events.Tensors("val/per_class/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| class | precision | recall | f1 | support |") and "| circle |" in table
    assert "weights/0.weight" in tags["histograms"] and "grads/0.weight" in tags["histograms"]
    assert tags["graph"]


@pytest.mark.slow
def test_per_class_json_agrees_with_the_epoch_metrics(ddp_run) -> None:
    run_dir, _ = ddp_run
    per_class = json.loads((run_dir / "per_class.json").read_text())
    last = records(run_dir)[-1]
    assert per_class["epoch"] == last["epoch"] and [c["class"] for c in per_class["classes"]] == \
        ["circle", "square", "triangle"]
    assert sum(c["support"] for c in per_class["classes"]) == last["val/samples"] == 24
    assert np.mean([c["recall"] for c in per_class["classes"]]) == pytest.approx(last["val/recall"])


@pytest.mark.slow
def test_profiler_writes_one_chrome_trace_per_rank(ddp_run) -> None:
    run_dir, result = ddp_run
    for rank in (0, 1):
        trace = json.loads((run_dir / "profile" / f"rank_{rank}_steps_2-3.json").read_text())
        events = trace["traceEvents"]
        per_thread = collections.Counter((event.get("tid"), event.get("name")) for event in events)
        assert any(event.get("name", "").startswith("aten::convolution") for event in events), (
            f"rank {rank}: no convolution in {len(events)} events; (thread, name) counts: "
            f"{per_thread.most_common(20)}\n{result.stdout[-3000:]}")
    assert f"profiler: steps 2-3 recorded, one trace per rank: {run_dir / 'profile'}" in result.stdout


# ----------------------------------------------------------------------------- resume, failures
@pytest.fixture(scope="module")
def rewound_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run SIGKILLed after step 30, its trackers holding steps up to 30, with its last checkpoint
    at step 20 (``ckpt.every_steps=20``), then resumed to the end (step 36)."""
    tmp = tmp_path_factory.mktemp("rewound")
    args = run_args(tmp, "rewound", "log.trackers=[jsonl,wandb,mlflow]", "log.pictures=false", "model.name=linear",
                    "log.every_steps=1", "ckpt.every_steps=20", "train.epochs=2")
    (tmp / "record").mkdir()
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "recording_worker.py"), *args], cwd=REPO,
                            env=child_env(RECORD_DIR=str(tmp / "record"), KILL_AFTER_STEP="30"),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    run_dir = tmp / "runs" / "rewound"
    assert torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["global_step"] == 20
    resumed = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=child_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout + resumed.stderr
    return run_dir


@pytest.mark.slow
def test_wandb_and_mlflow_continue_the_same_run_after_a_kill_and_resume(rewound_run) -> None:
    steps = [r["step"] for r in records(rewound_run)]
    assert steps == [18, 36]  # metrics.jsonl: what the checkpoint holds, then the resumed epoch
    wandb = wandb_runs(rewound_run)
    assert len(wandb) == 2, wandb.keys()  # one offline folder per process, both of the same run
    assert len({run_id for run_id, _ in wandb.values()}) == 1
    history = [row for _, rows in wandb.values() for row in rows if "val/top1" in row]
    assert [row["trainer/global_step"] for row in history] == steps  # one history: every epoch once, in order
    client, runs = mlflow_runs(rewound_run)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/top1")] == steps
    state = torch.load(rewound_run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["trackers"] == {"wandb": next(iter(wandb.values()))[0],
                                 "mlflow": runs[0].data.tags["launchpad.resume_key"]}


@pytest.mark.slow
def test_wandb_keeps_the_retrained_steps_after_a_marker_on_a_step_that_always_increases(rewound_run) -> None:
    (first_id, abandoned), (second_id, retrained) = wandb_runs(rewound_run).values()  # folders in write order
    assert first_id == second_id
    wandb_steps = [row["_step"] for row in abandoned + retrained]
    assert all(a < b for a, b in zip(wandb_steps, wandb_steps[1:])), wandb_steps  # wandb drops no row
    logged = [row["trainer/global_step"] for row in abandoned]  # step 30's row was still open at the kill
    assert logged == list(range(1, len(logged) + 1)) and len(logged) > 20, logged  # some steps to train again
    marker = next(i for i, row in enumerate(retrained) if "trainer/resumed_from_step" in row)
    assert retrained[marker]["trainer/resumed_from_step"] == 20 and retrained[marker]["trainer/attempt"] == 2
    assert [row["trainer/global_step"] for row in retrained[marker:] if "trainer/global_step" in row] == \
        list(range(21, 37))  # every re-trained step once, after the marker
    assert [row for row in retrained[:marker] if "trainer/global_step" in row] == []


@pytest.mark.slow
def test_mlflow_tells_the_retrained_values_from_the_abandoned_ones(rewound_run) -> None:
    client, runs = mlflow_runs(rewound_run)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id, tags = runs[0].info.run_id, runs[0].data.tags
    assert tags["launchpad.attempt"] == "2" and tags["launchpad.attempt.2"] == "resumed from step 20"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "trainer/resumed_from_step")] == [(20, 20)]
    attempt_of = {(m.step, m.timestamp): int(m.value) for m in client.get_metric_history(run_id, "trainer/attempt")}
    by_attempt = collections.defaultdict(list)
    for m in client.get_metric_history(run_id, "train/loss_running"):
        by_attempt[attempt_of[m.step, m.timestamp]].append((m.step, m.value))
    assert [step for step, _ in by_attempt[1]] == list(range(1, 31))  # the killed attempt, its last 10 abandoned
    assert [step for step, _ in by_attempt[2]] == list(range(21, 37))
    assert by_attempt[2][:10] == by_attempt[1][20:]  # the resume is exact: the same values, told apart


def test_the_wandb_step_axis_moves_past_every_step_an_earlier_attempt_logged(tmp_path: Path) -> None:
    path = tmp_path / "steps.json"
    first = StepAxis.resume(path, "run", 0)
    assert (first.attempt, first.to(1)) == (1, 1)
    first.last = 30
    first.save(path)
    rewound = StepAxis.resume(path, "run", 20)  # killed after step 30, checkpoint at 20
    assert (rewound.attempt, rewound.to(21)) == (2, 31)
    rewound.last = 45
    rewound.save(path)
    stopped = StepAxis.resume(path, "run", 35)  # stopped with a checkpoint at its last step
    assert (stopped.attempt, stopped.to(36)) == (3, 46)
    assert StepAxis.resume(path, "online", 20, server_step=51).to(21) == 51  # the server's next step
    assert StepAxis.resume(path, "other", 0).attempt == 1  # another wandb run's axis does not count


def test_a_tracker_that_cannot_be_imported_is_one_warning_and_the_run_completes(tmp_path: Path) -> None:
    hidden = tmp_path / "hidden" / "wandb"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('wandb hidden by the test')\n")
    env = child_env(PYTHONPATH=f"{tmp_path / 'hidden'}{os.pathsep}{REPO}")
    result = trainer(tmp_path, "no-wandb", "log.trackers=[jsonl,wandb]", "model.name=linear", "train.epochs=1",
                     "log.pictures=false", env=env)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "wandb" in line]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith("WARNING wandb is off for the rest of this run: open failed (cannot import wandb")
    assert "pip install 'torch-launchpad[wandb]'" in warnings[0]
    assert len(records(tmp_path / "runs" / "no-wandb")) == 1


# ----------------------------------------------------------------------------- units
class Failing(Sink):
    """A sink whose scalars raise, recording what reached it."""

    name = "failing"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def open(self, config: dict, config_yaml: str, resume_id: str | None, step: int) -> None:
        self.seen.append("open")

    def scalars(self, values: dict[str, float], step: int) -> None:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        self.seen.append("close")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_failing_background_sink_warns_once_and_drops_the_rest() -> None:
    inner, collect = Failing(), Collect()
    sink = BackgroundSink(inner)
    logging.getLogger("trainer").addHandler(collect)
    try:
        sink.open({}, "", None, 0)
        for step in range(5):
            sink.scalars({"train/loss": 1.0}, step)
        sink.close()
    finally:
        logging.getLogger("trainer").removeHandler(collect)
    assert not sink.thread.is_alive()
    assert [r.getMessage() for r in collect.records] == [
        "failing is off for the rest of this run: scalars failed ([Errno 28] No space left on device); "
        "training goes on"]
    assert inner.seen == ["open", "close"]


def test_early_stop_counts_epochs_since_the_last_real_improvement() -> None:
    def reason(values: list[float], mode: str = "max", patience: int = 2, delta: float = 0.01) -> str | None:
        return early_stop_reason([{"val/x": v} for v in values], "val/x", mode, patience, delta)

    assert reason([0.5, 0.6, 0.605]) is None  # one stale epoch so far
    assert reason([0.5, 0.6, 0.605, 0.609]) == ("val/x has not improved by more than 0.01 for 2 epochs "
                                                "(best 0.6000 at epoch 2, train.early_stop_patience=2)")
    assert reason([0.5, 0.6, 0.605, 0.62]) is None  # 0.62 beats 0.6 by more than 0.01
    assert reason([1.0, 0.8, 0.85, 0.9], mode="min") is not None
    assert reason([1.0, 0.8, 0.85, 0.9], patience=0) is None


def test_flops_of_a_linear_model_are_three_forward_matmuls() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert flops.training_flops_per_image(model, 8) == 3 * 2 * (3 * 8 * 8) * 5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training

    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x.sum().item()

    assert flops.training_flops_per_image(DataDependent(), 8) is None
    assert flops.throughput(3e9, 1000.0, 100.0, 2) == {"train/tflops": 3.0, "train/mfu": 0.015}
    assert flops.peak_tflops(torch.device("cpu"), "fp32", True) is None


def test_confusion_beyond_the_labelled_limit_is_a_heatmap_with_top_confusions_listed() -> None:
    n = MAX_LABELLED_CLASSES + 20
    counts = np.eye(n, dtype=np.int64) * 10
    counts[3, 7], counts[5, 2] = 4, 6
    classes = [f"c{i}" for i in range(n)]
    assert top_confusions(counts, classes) == [["c5", "c2", 6, 6 / 16], ["c3", "c7", 4, 4 / 14]]
    big = confusion_image(counts, classes)
    assert big.width >= n and big.height >= n
    small = confusion_image(counts[:6, :6], classes[:6])
    assert small.width > 6 * 40  # labelled, with counts in cells
    assert markdown_table(["a", "b"], [["x|y", 0.5]]) == "| a | b |\n|---|---|\n| x\\|y | 0.5000 |"


@pytest.mark.parametrize("value", ["5", "3-1", "0-2", "a-b"])
def test_profile_steps_must_be_a_range_of_steps(value: str) -> None:
    with pytest.raises(ConfigError, match=r"log.profile_steps: .* must be FIRST-LAST"):
        config.load([], [f"log.profile_steps={value}"])


def test_the_profiler_starts_and_stops_only_with_no_collective_in_flight(tmp_path: Path) -> None:
    """A gloo collective running while torch.profiler starts or stops corrupts the heap, so the
    profiler lets the loop finish its lagged poll (``quiesce``) just before each."""
    profiling_when_quiesced: list[bool] = []
    profiler = StepProfiler((2, 3), 0, torch.device("cpu"), tmp_path,
                            quiesce=lambda: profiling_when_quiesced.append(torch.autograd._profiler_enabled()))
    for steps_done in range(5):
        profiler.update(steps_done)
        torch.ones(4).add_(1)
    assert profiling_when_quiesced == [False, True]  # before the start, before the stop
    assert (tmp_path / "profile" / "rank_0_steps_2-3.json").exists()


def test_unknown_tracker_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"log.trackers: 'wandbb' is not one of tensorboard, jsonl, wandb, "
                                          r"mlflow nor an import path like my_pkg.sinks:build; did you mean 'wandb'"):
        config.load([], ["log.trackers=[tensorboard,wandbb]"])
    assert config.load([], ["log.trackers=[WandB,jsonl,wandb]"]).log.trackers == ["wandb", "jsonl"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_epochs_log_mfu_and_the_trace_holds_gpu_kernels(tmp_path: Path) -> None:
    result = trainer(tmp_path, "cuda", "dist.device=cuda", "train.precision=bf16", "train.epochs=2",
                     "log.profile_steps=2-4", "log.histogram_every_epochs=1")
    assert result.returncode == 0, result.stdout + result.stderr
    last = records(tmp_path / "runs" / "cuda")[-1]
    assert last["train/tflops"] > 0
    if flops.peak_tflops(torch.device("cuda", 0), "bf16", True) is not None:  # a GPU in the table
        assert 0 < last["train/mfu"] < 1
    trace = json.loads((tmp_path / "runs" / "cuda" / "profile" / "rank_0_steps_2-4.json").read_text())
    assert any(event.get("cat") == "kernel" for event in trace["traceEvents"])
