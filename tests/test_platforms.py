"""The roads off the CPU happy path, checked on a CPU: MPS dtypes, precision per device capability,
macOS memory units and affinity, one GPU per srun task, the training step's EMA, every torchvision
model, compile after DDP, requeue decisions, and evaluate/predict options."""

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
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision import models as tv_models

from trainer import checkpoint, config, models
from trainer.data.stages import Normalize
from trainer.errors import ConfigError, OutOfMemory
from trainer.observe import memory
from trainer.parallel import distributed, openmp, slurm, strategy
from trainer.parallel.signals import StopRequest
from trainer.parallel.strategy import Parallel
from trainer.tools.evaluate import main as evaluate_main
from trainer.train import precision
from trainer.tasks.classification import Classification
from trainer.tasks.confusion import ConfusionMeter
from trainer.train.meter import TrainMeter
from trainer.train.ema import ModelEma
from trainer.train.step import TrainStep
from trainer.train.worker import Worker

CPU = torch.device("cpu")
SINGLE = distributed.DistEnv(distributed.Topology(), CPU, None)
NORMALIZE = Normalize([0.5] * 3, [0.25] * 3, CPU)
REPO = Path(__file__).resolve().parents[1]
MPS_LACKS = (torch.float64, torch.complex128)


class DtypeRecorder(TorchDispatchMode):
    """Records the dtype of every tensor any op creates while active."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.made.append((str(func), tensor.dtype))
        return out

    def lacking(self) -> list[tuple[str, torch.dtype]]:
        return [(op, dtype) for op, dtype in self.made if dtype in MPS_LACKS]


def train_cfg(**changes: object) -> config.TrainConfig:
    cfg = config.TrainConfig(label_smoothing=0.1, clip_grad_norm=1.0, ema_decay=0.9)
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def small_step(cfg: config.TrainConfig) -> TrainStep:
    torch.manual_seed(0)
    net = models.build_model("smallcnn", 4, 16)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    return TrainStep(net, net, optimizer, Parallel(SINGLE), Classification(cfg.label_smoothing),
                     precision.resolve("fp32", CPU), CPU, cfg)


# ----------------------------------------------------------------------------- MPS and macOS
def test_the_step_and_the_meters_create_no_dtype_that_mps_lacks() -> None:
    step = small_step(train_cfg())
    train_meter, eval_meter = TrainMeter(window=4), ConfusionMeter(4, CPU)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=gen),  # as loaders return them
                torch.randint(0, 4, (8,), generator=gen)) for _ in range(6)]
    recorder = DtypeRecorder()
    with recorder:  # everything the device sees in a training epoch and a validation pass
        for i, (images, targets) in enumerate(batches):
            loss = step.micro_batch(NORMALIZE(images), targets, window=2, last=i % 2 == 1)
            train_meter.update(loss, 8, i)
        assert train_meter.flush() is None
        with torch.no_grad():
            logits = step.net.eval()(NORMALIZE(batches[0][0]))
            eval_meter.update(logits, batches[0][1])
    assert len(recorder.made) > 100, "the recorder saw the work"
    assert recorder.lacking() == []
    assert train_meter.reduce()["samples"] == 48 and eval_meter.reduce()["samples"] == 8


@pytest.mark.parametrize(("device", "capability", "macos14", "expected"), [
    ("cuda", (9, 0), None, ("bf16", False)),
    ("cuda", (8, 0), None, ("bf16", False)),
    ("cuda", (7, 5), None, ("fp16", True)),  # T4: bf16 would be emulated
    ("mps", None, True, ("bf16", False)),
    ("mps", None, False, ("fp32", False)),
    ("cpu", None, None, ("fp32", False)),
])
def test_auto_precision_follows_the_device_capability(monkeypatch: pytest.MonkeyPatch, device: str,
                                                      capability: tuple[int, int] | None, macos14: bool | None,
                                                      expected: tuple[str, bool]) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: capability)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda *_: macos14)
    chosen = precision.resolve("auto", torch.device(device))
    assert (chosen.name, chosen.scaled) == expected


def test_fp16_on_an_accelerator_always_has_a_scaler_and_emulated_bf16_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (7, 5))
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda *_: False)
    assert precision.resolve("fp16", torch.device("mps")).scaled
    assert precision.resolve("fp16", torch.device("cuda", 0)).scaled
    with pytest.raises(ConfigError, match=r"compute capability 7\.5.*use fp16 or auto"):
        precision.resolve("bf16", torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="macOS 14"):
        precision.resolve("bf16", torch.device("mps"))


def test_peak_memory_units_on_linux_and_macos(monkeypatch: pytest.MonkeyPatch) -> None:
    status = Path("/proc/self/status").read_text()
    high_water_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    linux = memory.max_rss_mb()
    assert abs(linux - high_water_kib / 1024) < 64  # same quantity, read two ways
    monkeypatch.setattr(memory.sys, "platform", "darwin")  # ru_maxrss is in bytes there
    assert memory.max_rss_mb() == pytest.approx(linux / 1024, rel=0.05)


def test_cpu_threads_without_an_affinity_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS and Windows have none
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert openmp.usable_cores() == os.cpu_count()
    threads = torch.get_num_threads()
    try:
        env = distributed.setup("cpu")
        assert env.device == CPU and torch.get_num_threads() == os.cpu_count()
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- CUDA device choice
@pytest.mark.parametrize(("source", "count", "expected"), [
    (distributed.SLURM_SOURCE, 1, "cuda:0"),  # srun --gpus-per-task: each task sees its own GPU
    (distributed.SLURM_SOURCE, 4, "cuda:3"),
    ("RANK/WORLD_SIZE", 4, "cuda:3"),
    ("RANK/WORLD_SIZE", 1, "error"),  # two torchrun workers on one GPU: refused in one line
])
def test_one_gpu_per_task_under_srun(monkeypatch: pytest.MonkeyPatch, source: str, count: int, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    topology = distributed.Topology(rank=3, local_rank=3, world_size=4, local_world_size=4, source=source)
    if expected == "error":
        with pytest.raises(distributed.EnvironmentProblem, match="local rank 3 has no GPU"):
            distributed.select_device("auto", topology)
    else:
        assert str(distributed.select_device("auto", topology)) == expected


# ----------------------------------------------------------------------------- the training step
def test_ema_matches_torch_averaged_model_and_counts_on_the_host() -> None:
    torch.manual_seed(0)
    net = models.build_model("smallcnn", 3, 16)
    ours = ModelEma(net, decay=0.8)
    theirs = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    for i in range(5):
        net(torch.randn(4, 3, 16, 16)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ours.update()
        theirs.update_parameters(net)
    assert isinstance(ours.updates, int) and ours.updates == 5
    expected = theirs.module.state_dict()
    for key, value in ours.module.state_dict().items():
        if value.is_floating_point():  # AveragedModel freezes integer buffers; ours follow the model's
            torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)
    saved, restored = small_step(train_cfg()), small_step(train_cfg())  # the step keeps the EMA's state
    saved.ema.update()
    restored.load_state_dict(saved.state_dict())
    assert restored.ema.updates == 1


def test_the_shorter_last_window_is_scaled_by_its_real_size() -> None:
    """Three micro-batches accumulated as a window of 3 equal one step on their concatenation."""
    cfg = train_cfg(label_smoothing=0.0, clip_grad_norm=0.0, ema_decay=0.0)
    accumulated, whole = small_step(cfg), small_step(cfg)
    whole.net.load_state_dict(accumulated.net.state_dict())
    accumulated.net.eval(), whole.net.eval()  # BatchNorm statistics per micro-batch would differ
    gen = torch.Generator().manual_seed(1)
    images, targets = torch.randn(12, 3, 16, 16, generator=gen), torch.randint(0, 4, (12,), generator=gen)
    for i in range(3):
        accumulated.micro_batch(images[4 * i:4 * i + 4], targets[4 * i:4 * i + 4], window=3, last=i == 2)
    whole.micro_batch(images, targets, window=1, last=True)
    for mine, reference in zip(accumulated.net.parameters(), whole.net.parameters()):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- models
def torchvision_names() -> list[str]:
    return tv_models.list_models(module=tv_models)


BUILT_DIFFERENTLY = ("googlenet", "inception_v3", "vit_b_16", "maxvit_t", "alexnet", "resnet18")
"""Models whose builder gets extra arguments (aux heads off, input size), and two plain ones."""


def smallest_size(name: str) -> tuple[nn.Module, int]:
    """``name`` built by ``models.build_model`` (which runs one training-mode forward pass on meta
    tensors) at the smallest of 32/64/224 px it accepts; smaller sizes must be refused in one line.
    On the meta device (no memory, no compute), except RegNets, whose builder reads tensor values."""
    for size in (32, 64, 224):
        try:
            with torch.device("cpu" if name.startswith("regnet") else "meta"):
                return models.build_model(name, 5, size), size
        except ConfigError as exc:
            assert f"model.name={name}" in str(exc) and "\n" not in str(exc)
    pytest.fail(f"{name} trains at none of 32, 64, 224 px")


@pytest.mark.slow
def test_every_torchvision_classifier_builds_for_training_or_is_refused_in_one_line() -> None:
    sizes = {name: smallest_size(name)[1] for name in tv_models.list_models(module=tv_models)
             if not name.startswith("regnet") or name.endswith(("400mf", "800mf", "1_6gf"))}  # big RegNets: same code
    assert {sizes[name] for name in ("alexnet", "vit_b_16")} == {64, 32}
    assert {name for name, size in sizes.items() if size == 224} == {"inception_v3", "maxvit_t", "vit_h_14"}


@pytest.mark.parametrize("name", BUILT_DIFFERENTLY)
def test_models_with_builder_options_train(name: str) -> None:
    """One training step's forward and backward: logits out, a gradient for every parameter."""
    model, size = smallest_size(name)
    params = {k: torch.empty_like(v, device="meta", requires_grad=True) for k, v in model.named_parameters()}
    params.update({k: torch.empty_like(v, device="meta") for k, v in model.named_buffers()})
    logits = torch.func.functional_call(model.train(), params, (torch.empty(2, 3, size, size, device="meta"),))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 5)
    grads = torch.autograd.grad(logits.sum(), [params[k] for k, _ in model.named_parameters()], allow_unused=True)
    assert all(g is not None for g in grads)


# ----------------------------------------------------------------------------- compile after DDP
def test_compile_wraps_ddp_not_the_other_way_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        env = distributed.DistEnv(distributed.Topology(), CPU, "gloo", dist.new_group(backend="gloo"))
        cfg = config.load([], [f"log.output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
                               "data.synthetic_classes=2", "data.synthetic_train_per_class=8",
                               "data.synthetic_val_per_class=2", "data.image_size=16", "data.batch_size=4",
                               "data.num_workers=0", "model.compile=true"])
        worker = Worker(cfg, env, cfg.run_dir, StopRequest())
        compiled = worker.step.model
        assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
        assert isinstance(compiled._orig_mod, DistributedDataParallel) and compiled._orig_mod.module is worker.net
        assert models.unwrap(compiled) is worker.net
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("compiled", [False, True], ids=["ddp", "compiled-ddp"])
def test_accumulation_all_reduces_once_per_window_also_when_compiled(compiled: bool) -> None:
    """``no_sync`` on every micro-batch but the window's last: one gradient all-reduce per optimizer
    step, also when ``torch.compile`` wraps the DDP module (the eager backend: the wrapping is the point)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = models.build_model("linear", 3, 8)
        parallel = strategy.DataParallel(distributed.DistEnv(distributed.Topology(), CPU, "gloo"))
        ddp = parallel.wrap(net)
        reductions: list[int] = []

        def counting_allreduce(state, bucket):  # type: ignore[no-untyped-def]  # DDP rejects string annotations
            reductions.append(bucket.index())  # one process: the bucket's sum is itself
            future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        ddp.register_comm_hook(None, counting_allreduce)
        model = torch.compile(ddp, backend="eager") if compiled else ddp
        step = TrainStep(net, model, torch.optim.SGD(net.parameters(), lr=0.1), parallel, Classification(),
                         precision.resolve("fp32", CPU), CPU, train_cfg(ema_decay=0.0))
        images, targets = NORMALIZE(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)), torch.tensor([0, 1, 2, 0])
        for index in range(6):  # two windows of three micro-batches
            step.micro_batch(images, targets, window=3, last=index % 3 == 2)
    finally:
        dist.destroy_process_group()
    assert len(reductions) == 2 * len(set(reductions)), reductions


# ----------------------------------------------------------------------------- stopping and requeue
def test_requeue_is_decided_on_every_signal_received() -> None:
    stop = StopRequest()
    previous = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGUSR1", "SIGTERM")}
    try:
        stop.install(["SIGUSR1", "SIGTERM"])
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning ...
        os.kill(os.getpid(), signal.SIGTERM)  # ... then the time limit
        deadline = time.monotonic() + 5
        while len(stop.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
    assert stop.received == ["SIGUSR1", "SIGTERM"] and "SIGUSR1" in stop.received


@pytest.mark.parametrize(("restarts", "limit", "expected"), [("0", 3, True), ("2", 3, True), ("3", 3, False),
                                                            (None, 0, False)])
def test_requeues_stop_at_the_configured_limit(restarts: str | None, limit: int, expected: bool) -> None:
    environ = {"SLURM_JOB_ID": "7"} | ({"SLURM_RESTART_COUNT": restarts} if restarts is not None else {})
    assert slurm.may_requeue(limit, environ) is expected


# ----------------------------------------------------------------------------- config checked up front
@pytest.mark.parametrize(("overrides", "message"), [
    (["ckpt.metric=val/top2"], "ckpt.metric: 'val/top2' is not logged; did you mean 'val/top5' or 'val/top1'"),
    (["ckpt.metric=val_ema/top1"], "ckpt.metric: 'val_ema/top1' is not logged"),  # no EMA configured
])
def test_checkpoint_metric_is_checked_with_the_config(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        config.load([], overrides)
    assert config.load([], ["ckpt.metric=val_ema/top1", "train.ema_decay=0.99"]).ckpt.metric == "val_ema/top1"


def test_out_of_memory_in_the_optimizer_step_gives_the_hint(tmp_path: Path) -> None:
    """Adam allocates its state in its first step: an OOM there (faked here: no GPU) is one line."""
    cfg = config.load([], [f"log.output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
                           "data.synthetic_classes=2", "data.synthetic_train_per_class=8",
                           "data.synthetic_val_per_class=2", "data.image_size=16", "data.batch_size=4",
                           "data.num_workers=0", "model.name=linear", "optim.name=adam"])
    worker = Worker(cfg, distributed.setup("cpu"), cfg.run_dir, StopRequest())

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    worker.optimizer.step = out_of_memory  # type: ignore[method-assign]
    images, targets = torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)
    with pytest.raises(OutOfMemory, match=r"data.batch_size=4 per process; try data.batch_size=2 "
                                          r"train.grad_accum_steps=2"):
        worker.loop._train_step(images, targets, 1, True)


# ----------------------------------------------------------------------------- evaluate and predict
def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_evaluate_takes_the_ema_when_best_was_chosen_on_it_and_runs_fp16_checkpoints_in_fp32(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = cli("trainer", f"log.output_dir={tmp_path}", "log.name=ema", f"data.cache_dir={tmp_path / 'cache'}",
                "model.name=linear", "data.synthetic_classes=3", "data.synthetic_train_per_class=40",
                "data.synthetic_val_per_class=10", "data.image_size=16", "data.num_workers=0", "train.epochs=1",
                "data.batch_size=8",
                "train.ema_decay=0.5", "ckpt.metric=val_ema/loss", "ckpt.mode=min", "log.progress_bar=off")
    assert train.returncode == 0, train.stderr
    logged = json.loads((tmp_path / "ema" / "metrics.jsonl").read_text())
    best = tmp_path / "ema" / "checkpoints" / "best.pt"

    def evaluate(*args: str) -> dict[str, float]:
        """``python -m trainer.evaluate ARGS``, in this process: the printed metrics."""
        capsys.readouterr()
        code = evaluate_main(list(args))
        out, err = capsys.readouterr()
        assert code == 0, err
        return json.loads(out.strip().splitlines()[-1])

    metrics = {which: evaluate(str(best), *(["--weights", which] if which != "auto" else []),
                               "data.num_workers=0")  # an override after the option, as users type it
               for which in ("auto", "model", "ema")}
    assert metrics["auto"] == metrics["ema"] != metrics["model"]
    for which, prefix in (("ema", "val_ema/"), ("model", "val/")):
        assert metrics[which]["loss"] == pytest.approx(logged[prefix + "loss"], abs=1e-6)
        assert metrics[which]["top1"] == pytest.approx(logged[prefix + "top1"], abs=1e-9)
    state = checkpoint.load(best)  # as if trained with fp16 on a GPU
    state["config"]["train"]["precision"] = "fp16"
    checkpoint.save_atomic(state, tmp_path / "fp16.pt")
    assert evaluate(str(tmp_path / "fp16.pt"), "data.num_workers=0") == metrics["auto"]
