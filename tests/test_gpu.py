"""CUDA-only behaviour: mixed precision on the GPU, CPU prediction from a GPU checkpoint, OOM message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def trainer(*args: str, module: str = "trainer", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def small(tmp: Path, name: str, *extra: str) -> list[str]:
    return [f"log.output_dir={tmp}", f"log.name={name}", f"data.cache_dir={tmp / 'cache'}",
            "data.synthetic_train_per_class=200", "data.synthetic_val_per_class=50", "train.epochs=4",
            "log.progress_bar=off", *extra]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cuda(tmp_path: Path, precision: str) -> None:
    result = trainer(*small(tmp_path, precision, f"train.precision={precision}", "model.channels_last=true"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"precision {precision}" in result.stdout and "on cuda:0" in result.stdout
    records = [json.loads(line) for line in (tmp_path / precision / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val/top1"] > 0.8 and records[-1]["train/loss"] < records[0]["train/loss"]
    assert records[-1]["train/peak_mem_mb"] > 0


def test_gpu_checkpoint_predicts_on_cpu(tmp_path: Path) -> None:
    assert trainer(*small(tmp_path, "gpu", "train.epochs=2")).returncode == 0
    images = sorted((tmp_path / "cache").glob("*/val/*/*.png"))[:5]
    result = trainer(str(tmp_path / "gpu" / "checkpoints" / "best.pt"), *map(str, images),
                     module="trainer.predict", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 5


def test_out_of_memory_names_the_batch_size(tmp_path: Path) -> None:
    result = trainer(*small(tmp_path, "oom", "model.name=resnet152", "data.image_size=128",
                            "data.batch_size=4096", "data.synthetic_train_per_class=700",
                            "data.synthetic_classes=6", "data.num_workers=4", "train.precision=fp32"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "data.batch_size=4096" in result.stderr and "train.grad_accum_steps=2" in result.stderr


# ----------------------------------------------------------------------------- in-process checks
def in_process_worker(tmp: Path, *extra: str):  # type: ignore[no-untyped-def]
    from trainer import config
    from trainer.parallel import distributed
    from trainer.parallel.signals import StopRequest
    from trainer.train.worker import Worker

    cfg = config.load([], small(tmp, "inproc", "data.num_workers=0", "dist.device=cuda", *extra))
    worker = Worker(cfg, distributed.setup("cuda"), cfg.run_dir, StopRequest())
    return worker


def test_scaler_skips_a_step_with_an_injected_inf_gradient(tmp_path: Path) -> None:
    worker = in_process_worker(tmp_path, "train.precision=fp16", "train.epochs=1")
    calls: list[int] = []

    def inf_once(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return grad * float("inf") if len(calls) == 3 else grad

    next(worker.net.parameters()).register_hook(inf_once)
    assert worker.train_epoch() is not None
    assert worker.step.skipped() == 1
    assert all(torch.isfinite(p).all() for p in worker.net.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_steady_state_steps_never_sync_the_host(tmp_path: Path, precision: str) -> None:
    """EMA, the loss meter, the scaler and the stop poll, between meter flushes: no host sync."""
    worker = in_process_worker(tmp_path, f"train.precision={precision}", "train.ema_decay=0.99",
                               "train.clip_grad_norm=1.0", "log.every_steps=1000", "model.channels_last=true")
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 3, 32, 32, generator=gen).cuda(), torch.randint(0, 6, (64,), generator=gen).cuda())
               for _ in range(4)]
    for images, targets in batches:  # warm-up: lazy state (optimizer, scaler) is created here
        worker.loop._train_step(images, targets, 1, True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, (images, targets) in enumerate(batches * 3):
            loss = worker.loop._train_step(images, targets, 1, True)
            worker.loop.meter.update(loss, 64, i)
            worker.policy.poll(worker.record.global_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert worker.step.ema is not None and worker.step.ema.updates == 16


def test_deterministic_runs_are_bitwise_identical(tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        result = trainer(*small(tmp_path, name, "train.deterministic=true", "train.epochs=2", "model.name=resnet18"))
        assert result.returncode == 0, result.stdout + result.stderr
        runs.append(torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_uint8_batches_normalised_on_cuda_equal_the_cpu_float_pipeline() -> None:
    """The step's conversion on the GPU (channels_last kept) gives ToTensor + Normalize's values to 1e-6."""
    from torchvision import transforms

    from trainer.data.stages import Normalize

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = torch.stack([transforms.Normalize(mean, std)(image.float() / 255) for image in pixels])
    on_device = pixels.to("cuda", memory_format=torch.channels_last)
    images = Normalize(mean, std, torch.device("cuda"))(on_device)
    assert images.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(images.cpu(), expected, rtol=0, atol=1e-6)


def test_the_flight_recorder_settings_are_in_force_on_an_nccl_group(tmp_path: Path) -> None:
    """dist.flight_recorder=auto on NCCL: torch keeps the configured number of collectives, dumps
    on a timeout, and a hang's dump lands in the run directory (tests/flight_recorder_probe.py)."""
    result = subprocess.run([sys.executable, str(REPO / "tests" / "flight_recorder_probe.py"), "nccl", "auto", "7",
                             str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["entries"] == 7 and found["last_record_id"] >= 9, found
    assert found["ops"] == ["nccl:all_reduce"] and found["folder_exists"]
    assert found["env"]["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and found["env"]["TORCH_FR_BUFFER_SIZE"] == "7"
    assert found["dump"] == str(tmp_path / "logs" / "flight_recorder" / "rank_0")


# ----------------------------------------------------------------------------- decoding on the device
def photo_folder(root: Path, per_split: dict[str, int]) -> Path:
    """Photo-sized JPEGs (smooth random content) in 3 classes, each split."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in per_split.items():
        for i in range(count):
            folder = root / split / f"class{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            width, height = int(rng.integers(300, 640)), int(rng.integers(240, 480))
            coarse = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR).save(
                folder / f"{i:04d}.jpg", quality=90)
    return root


def encoded_batches(root: Path, batch: int, train: bool = True):  # type: ignore[no-untyped-def]
    """(the CPU path's batches, the same batches left encoded) over the training split."""
    from trainer import config
    from trainer.data import loaders, sources

    cfg = config.load([], ["data.source=imagefolder", f"data.root={root}", "data.image_size=128",
                           "data.random_resized_crop=true", "data.jpeg_draft=false"]).data
    split = sources.load_splits(cfg).train
    on_cpu = loaders.SeededTransformDataset(split, loaders.build_transform(cfg, train), 0)
    on_device = loaders.SeededTransformDataset(split, loaders.build_transform(cfg, train, True), 0)
    starts = range(0, len(split) - batch + 1, batch)
    return ([loaders.collate_skipping_bad([on_cpu[(0, i)] for i in range(s, s + batch)]) for s in starts],
            [loaders.collate_skipping_bad([on_device[(0, i)] for i in range(s, s + batch)]) for s in starts])


def test_nvjpeg_batches_give_the_cpu_paths_crops(tmp_path: Path) -> None:
    from trainer.data.device_decode import DeviceDecoder

    expected, encoded = encoded_batches(photo_folder(tmp_path, {"train": 32, "val": 3}), 16)
    decoder = DeviceDecoder(torch.device("cuda"), torch.channels_last)
    for cpu_batch, batch in zip(expected, encoded):
        decoded = decoder(batch)
        assert decoded.images.is_cuda and decoded.images.is_contiguous(memory_format=torch.channels_last)
        difference = (decoded.images.cpu().int() - cpu_batch.images.int()).abs().float()
        # nvjpeg's IDCT and upsampling and CUDA's resize are not libjpeg's and PIL's: close, not within 1
        assert difference.mean() < 1.5, difference.mean()
    assert decoder.cpu_decoded == 0 and decoder.samples == 32


def test_decoding_never_syncs_the_host_from_our_code(tmp_path: Path) -> None:
    """torchvision waits for its own decoder stream (a raw CUDA call the debug mode does not see);
    cutting, resizing, stacking and handing the batch to the compute stream must not sync."""
    from trainer.data.device_decode import DeviceDecoder
    from trainer.data.stages import DecodeAhead

    _, batches = encoded_batches(photo_folder(tmp_path, {"train": 48, "val": 3}), 16)
    decoder = DeviceDecoder(torch.device("cuda"), torch.channels_last)
    list(DecodeAhead(batches, decoder))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        served = [batch.images.float().mean() for batch in DecodeAhead(batches, decoder)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(served) == 3


def test_decode_ahead_overlaps_the_compute_stream(tmp_path: Path) -> None:
    """Decoding batch k+1 on the side stream runs while batch k's work runs on the compute stream:
    both together take clearly less than one after the other."""
    import time

    from trainer.data.device_decode import DeviceDecoder
    from trainer.data.stages import DecodeAhead

    _, batches = encoded_batches(photo_folder(tmp_path, {"train": 8 * 32, "val": 3}), 32)
    decoder = DeviceDecoder(torch.device("cuda"), torch.channels_last)
    list(DecodeAhead(batches[:2], decoder))  # warm-up: nvjpeg handles, kernels
    torch.cuda.synchronize()
    started = time.perf_counter()
    list(DecodeAhead(batches, decoder))
    torch.cuda.synchronize()
    decoding = time.perf_counter() - started
    x = torch.randn(4096, 4096, device="cuda")

    def step(count: int) -> None:
        y = x
        for _ in range(count):
            y = torch.tanh(y @ x * 1e-4)

    step(2)
    torch.cuda.synchronize()
    started = time.perf_counter()
    step(20)
    torch.cuda.synchronize()
    per_matmul = (time.perf_counter() - started) / 20
    count = max(1, round(decoding / len(batches) / per_matmul))  # a step as long as a batch's decode
    started = time.perf_counter()
    for _ in batches:
        step(count)
    torch.cuda.synchronize()
    stepping = time.perf_counter() - started
    started = time.perf_counter()
    for batch in DecodeAhead(batches, decoder):
        step(count)
        batch.images.float().mean()  # the step reads the decoded images on the compute stream
    torch.cuda.synchronize()
    both = time.perf_counter() - started
    assert both < 0.85 * (decoding + stepping), (both, decoding, stepping)


def test_a_run_decodes_on_cuda(tmp_path: Path) -> None:
    root = photo_folder(tmp_path / "photos", {"train": 96, "val": 24})
    result = trainer(*small(tmp_path, "decode", "data.source=imagefolder", f"data.root={root}", "data.decode=gpu",
                            "data.auto_augment=trivialaugment", "data.random_resized_crop=true",
                            "data.image_size=64", "data.batch_size=16", "train.epochs=2", "model.channels_last=true",
                            "train.precision=bf16"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "JPEGs decoded on cuda:0" in result.stdout and "decoded on the CPU" not in result.stdout
    records = [json.loads(line) for line in (tmp_path / "decode" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/decode_time_s"] > 0 for r in records)
